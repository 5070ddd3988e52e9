"""Benchmark `moe-local serve`: aggregate decode tokens/s at 1, 4 and 8 concurrent streams, and how often
batching changes a greedy token in the model's own dtype (in fp32 it must never; see tests/test_batch.py).

    python scripts/bench_server.py                       # the demo model, its own dtype (bf16)
    python scripts/bench_server.py /models/Mixtral-8x7B-Instruct-v0.1 --serve-args "--gpu-memory 12GiB"
    python scripts/bench_server.py --json-schema --streams 1 8   # every answer constrained by a JSON schema's grammar

Starts the server as a subprocess on a free loopback port and streams greedy completions to it from
threads, each request asking for --max-tokens tokens; prints one JSON object."""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

import moe_local
from moe_local.batch import Batcher, Request
from moe_local.generate import SamplingParams

DEMO = Path(moe_local.__file__).parent / "demo"
PROMPTS = ["def parse(text):", "import os\n\nclass Walker:", "for i in range(", "def main(argv=None):\n    ", "with open(path) as f:",
           "class Config:\n    def __init__(self", "try:\n    import json", "def test_", "return sorted(", "if __name__ =="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str | None, threads: int | None, extra: list[str], parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "moe_local", "serve", *([model] if model else []), "--port", str(port), "--quiet",
               "--parallel", str(parallel), *(["--threads", str(threads)] if threads else []), *extra]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    sys.exit(f"the server did not start: {process.communicate()[1]}")


# --json-schema: a list of people no answer can finish before max_tokens, so that every stream stays constrained
PEOPLE = {"type": "array", "minItems": 1000, "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
    "additionalProperties": False}}


def stream(url: str, prompt: str, max_tokens: int, schema: dict | None = None) -> int:
    """Stream one completion; its completion_tokens. The client does as little as it can per event (it
    shares this machine's cores with the server): it keeps the stream's last bytes and reads only the final
    chunk, the one with the usage."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": schema}}
    tail = b""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for chunk in response.iter_raw():
            tail = (tail + chunk)[-8192:]
    usage = [line for line in tail.decode(errors="replace").splitlines() if line.startswith("data: {") and '"usage"' in line]
    return json.loads(usage[-1][6:])["usage"]["completion_tokens"]


def aggregate(url: str, streams: int, max_tokens: int, rounds: int, schema: dict | None = None) -> dict:
    """`streams` clients at once, each streaming `rounds` requests one after the other."""
    def client(i: int) -> int:
        return sum(stream(url, PROMPTS[(i + r) % len(PROMPTS)], max_tokens, schema) for r in range(rounds))

    stream(url, PROMPTS[0], 4, schema)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(client, range(streams)))
    seconds = time.perf_counter() - start
    return {"streams": streams, "tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 2)}


def batching_changes(model: str | None, dtype: str | None, n_tokens: int, batch: int) -> dict:
    """Greedy answers to PROMPTS, each alone and all decoded together in one batch: how many differ, and where."""
    engine = moe_local.load(model or DEMO, device="cpu", dtype=dtype, sequences=batch)  # the server's pooled caches
    greedy = SamplingParams(temperature=0)
    alone = []
    for p in PROMPTS:
        engine.tokens = []
        alone.append(list(engine.generate(engine.tokenizer.encode(p), n_tokens, greedy)))
    batcher, outputs = Batcher(engine, batch), [[] for _ in PROMPTS]
    for p, out in zip(PROMPTS, outputs):
        batcher.submit(Request(engine.tokenizer.encode(p), n_tokens, greedy, out.append))
    while batcher.load:
        batcher.poll()
    changed = sum(engine.tokenizer.decode(a) != "".join(o.text for o in out) for a, out in zip(alone, outputs))
    return {"dtype": str(engine.dtype).removeprefix("torch."), "requests": len(PROMPTS), "tokens_each": n_tokens,
            "batch": batch, "requests_changed": changed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or Hugging Face id (default: the demo model)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--threads", type=int, help="torch threads in the server (default: torch's)")
    parser.add_argument("--serve-args", default="", help="more `moe-local serve` options, e.g. '--gpu-memory 12GiB'")
    parser.add_argument("--dtype", help="compute dtype of the batching-changes check (default: the model's)")
    parser.add_argument("--json-schema", action="store_true", help="every request asks for JSON of a schema (PEOPLE): constrained decoding")
    parser.add_argument("--no-batching-check", action="store_true", help="leave out the batching-changes check")
    args = parser.parse_args()
    process, url = start(args.model, args.threads, shlex.split(args.serve_args), max(args.streams))
    try:
        runs = [aggregate(url, n, args.max_tokens, args.rounds, PEOPLE if args.json_schema else None) for n in args.streams]
    finally:
        process.terminate()
        process.communicate(timeout=60)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"model": args.model or "demo", "threads": args.threads or torch.get_num_threads(), "max_tokens": args.max_tokens,
              "json_schema": args.json_schema, "runs": runs, "speedup": {r["streams"]: round(r["tok_per_s"] / runs[0]["tok_per_s"], 2) for r in runs}}
    if not args.no_batching_check:
        result["batching_changes"] = batching_changes(args.model, args.dtype, args.max_tokens, len(PROMPTS))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

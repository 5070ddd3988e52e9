"""Decode steps of a model on `--device cpu` with its fused attention blocks (`cpu_attention.Fused`) and resident MLP
kernel (`cpu_mlp.Fused`) each on or off, in one process, interleaved over rounds: what each takes off a token.

    python scripts/cpu_vs_llama_cpp.py make /tmp/g4-peer --family gemma4 --pairs bf16,q4_0
    python scripts/fused_decode_ab.py /tmp/g4-peer/hf --rounds 5 --tokens 24
    python scripts/fused_decode_ab.py /tmp/g4-peer/hf --resident-dtype int4 --experts-dtype int4

Each round decodes `--tokens` greedy tokens after the same `--prompt-tokens` prompt (the cache cut back to the prompt
between configurations) with: neither, the attention blocks only, both (each round starting with the next). Prints ms a token per round, then min and
median; and whether the greedy tokens agree."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import moe_local
from moe_local.model import DenseMLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts-dtype", default="bf16")
    parser.add_argument("--resident-dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = [1] + [100 * (i + 1) % 2000 + 3 for i in range(args.prompt_tokens - 1)]  # as cpu_vs_llama_cpp.py's
    engine = moe_local.load(args.folder, device="cpu", dtype="bf16", experts_dtype=args.experts_dtype,
                            resident_dtype=args.resident_dtype, ctx_size=len(prompt) + args.tokens + 8)  # fmt: skip
    blocks = [(block, block.fused) for block in engine.model.layers]
    mlps = [(m, m.fused) for m in engine.model.modules() if isinstance(m, DenseMLP)]
    print(f"fused attention blocks: {sum(f is not None for _, f in blocks)} of {len(blocks)}; MLPs through the kernel: "
          f"{sum(f is not None for _, f in mlps)} of {len(mlps)}")  # fmt: skip
    first = int(engine.prefill(prompt)[0].argmax())

    def decode(attention: bool, mlp: bool) -> tuple[float, list[int]]:
        for block, fused in blocks:
            block.fused = fused if attention else None
        for m, fused in mlps:
            m.fused = fused if mlp else None
        engine.tokens = engine.tokens[: len(prompt)]
        token, chosen = first, []
        start = time.perf_counter()
        for _ in range(args.tokens):
            token = int(engine.decode_one(token).argmax())
            chosen.append(token)
        return (time.perf_counter() - start) / args.tokens * 1e3, chosen

    configs = [(False, False), (True, False), (True, True)]
    names = {c: f"attention {'fused' if c[0] else 'torch'}, MLP {'kernel' if c[1] else 'torch'}" for c in configs}
    decode(True, True)  # warm-up
    times: dict[tuple[bool, bool], list[float]] = {c: [] for c in configs}
    tokens = {}
    for r in range(args.rounds):
        for c in configs[r % 3 :] + configs[: r % 3]:  # each configuration first in turn: no order favoured
            ms, tokens[c] = decode(*c)
            times[c].append(ms)
        print(f"round {r + 1}: " + ", ".join(f"{names[c]} {times[c][-1]:.2f} ms" for c in configs), flush=True)
    for c in configs:
        print(f"{names[c]}: {min(times[c]):.2f} / {statistics.median(times[c]):.2f} ms a token (min / median)")
    print("greedy tokens agree:", all(tokens[c] == tokens[configs[0]] for c in configs))


if __name__ == "__main__":
    main()

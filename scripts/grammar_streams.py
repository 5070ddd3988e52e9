"""Grammar-constrained streams in the `Batcher` (in process, no HTTP): the aggregate decode tokens/s of 1 and 8
greedy streams, free and each constrained by a JSON schema's grammar (bench_server.PEOPLE: no answer finishes
before the token limit), interleaved round after round, one torch thread.

    python scripts/grammar_streams.py [TOKENS] [MODEL]   # TOKENS per request (default 64); MODEL a folder (default the demo)

Each run is short (a second or two on the demo model), so that it needs no benchmark lock on a shared machine;
the server end to end: `python scripts/bench_server.py --json-schema --streams 1 8`."""

from __future__ import annotations

import sys
import time

import torch

import moe_local
from moe_local.batch import Batcher, Request
from moe_local.generate import SamplingParams
from moe_local.grammar import json_grammar

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_server import DEMO, PEOPLE, PROMPTS  # noqa: E402


def main(tokens: int, model: str | None, rounds: int = 3) -> None:
    torch.set_num_threads(1)
    engine = moe_local.load(model or DEMO, device="cpu", sequences=8)
    batcher, grammar, greedy = Batcher(engine, 8), json_grammar(PEOPLE), SamplingParams(temperature=0)

    def run(streams: int, constrained: bool) -> float:
        done = []
        for prompt in PROMPTS[:streams]:
            batcher.submit(Request(engine.tokenizer.encode(prompt), tokens, greedy, done.append, grammar=grammar if constrained else None))
        start = time.perf_counter()
        while batcher.load:
            batcher.poll()
        return sum(o.completion_tokens for o in done if o.finish_reason) / (time.perf_counter() - start)

    run(1, True), run(8, True)  # warm-up: the grammar's vocabulary, the caches
    rates: dict[tuple[int, bool], list[float]] = {}
    for _ in range(rounds):
        for streams in (1, 8):
            for constrained in (False, True):
                rates.setdefault((streams, constrained), []).append(run(streams, constrained))
    for (streams, constrained), values in rates.items():
        print(f"{streams} stream(s), {'constrained' if constrained else 'free'}: {[round(v) for v in values]} tok/s")
    for constrained in (False, True):
        print(f"8 vs 1, {'constrained' if constrained else 'free'}: {[round(a / b, 2) for a, b in zip(rates[8, constrained], rates[1, constrained])]}")
    for streams in (1, 8):
        print(f"constrained / free at {streams}: {[round(a / b, 2) for a, b in zip(rates[streams, True], rates[streams, False])]}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64, sys.argv[2] if len(sys.argv) > 2 else None)

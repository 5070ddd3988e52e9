"""moe-local's CPU kernels (`moe_local/native.py`) against torch's, in one process on one engine, so that the
machine's noise falls on both alike: blocks of greedy decode tokens after a prompt, alternating the
kernels and torch's paths (the kernels' callers patched to decline), the medians compared.

    python scripts/cpu_kernels_ab.py /tmp/cpu-peer/hf --experts-dtype int4 --resident-dtype int4 --prompt-tokens 900

The model folder is any checkpoint (e.g. the one `scripts/cpu_vs_llama_cpp.py make` writes; default: the
demo model). Prints one line per run: tok/s with each and the ratio."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import moe_local
from moe_local import cpu_attention, int4, int8
from moe_local.experts import formats, mxfp4

DEMO = Path(moe_local.__file__).parent / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEMO))
    parser.add_argument("--experts-dtype", default="auto")
    parser.add_argument("--resident-dtype", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=900)
    parser.add_argument("--tokens", type=int, default=16, help="decode tokens per block")
    parser.add_argument("--blocks", type=int, default=6, help="blocks with each")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = moe_local.load(args.model, device="cpu", experts_dtype=args.experts_dtype, resident_dtype=args.resident_dtype,
                            ctx_size=args.prompt_tokens + args.tokens + 1)
    prompt = [1] + [100 * (i + 1) % 2000 + 3 for i in range(args.prompt_tokens - 1)]
    attend, rows, grouped = cpu_attention.attend, mxfp4.NATIVE_MAX_ROWS, formats.GROUPED_MAX_ROWS
    linear, linear4, fused = int8.KERNEL_MAX_ROWS, int4.KERNEL_MAX_ROWS, [block.fused for block in engine.model.layers]
    tables = engine.experts.tables

    def use(kernels: bool) -> None:
        cpu_attention.attend = attend if kernels else (lambda *a: None)
        mxfp4.NATIVE_MAX_ROWS = rows if kernels else 0
        formats.GROUPED_MAX_ROWS = grouped if kernels else 0
        int8.KERNEL_MAX_ROWS = linear if kernels else 0
        int4.KERNEL_MAX_ROWS = linear4 if kernels else 0
        for block, step in zip(engine.model.layers, fused):
            block.fused = step if kernels else None
        engine.experts.tables = tables if kernels else [None] * len(tables)

    def block() -> float:
        token = int(engine.prefill(prompt)[0].argmax())  # the prompt's cache is reused: only its last token runs again
        start = time.perf_counter()
        for _ in range(args.tokens):
            token = int(engine.decode_one(token).argmax())
        return args.tokens / (time.perf_counter() - start)

    block()  # warm-up, and the prompt's prefill
    speeds: dict[bool, list[float]] = {True: [], False: []}
    for b in range(args.blocks):
        for kernels in (True, False) if b % 2 == 0 else (False, True):
            use(kernels)
            speeds[kernels].append(block())
    use(True)
    ours, theirs = statistics.median(speeds[True]), statistics.median(speeds[False])
    print(f"{Path(args.model).name}, experts {engine.store.format.key}, {args.tokens} tokens after {args.prompt_tokens}, "
          f"{torch.get_num_threads()} threads: moe-local's kernels {ours:.1f} tok/s, torch's {theirs:.1f} "
          f"(medians of {args.blocks} blocks each): {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()

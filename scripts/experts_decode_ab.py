"""One decode token's k experts of one MoE layer through `experts_decode` (what `--device cpu` runs for each MoE
layer of a decode step: `formats.DecodeTable`), in several expert formats, alternating between them so that a
busy machine's load falls on all alike; random experts at a preset's widths. Prints each format's min and median
milliseconds per call and the median ratios to the first format.

    python scripts/experts_decode_ab.py --preset qwen3-30b-a3b --formats bf16 fp8 int8 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_local.config import preset_config
from moe_local.experts.formats import make_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--formats", nargs="+", default=["bf16", "fp8", "int8"])
    parser.add_argument("--experts", type=int, default=32, help="experts in the layer (the k are drawn among them)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset, 1)
    gen = torch.Generator().manual_seed(0)
    tables = {}
    for name in args.formats:
        fmt = make_format(name, cfg, torch.bfloat16, "cpu")
        buffers = [torch.empty(fmt.expert_bytes, dtype=torch.uint8) for _ in range(args.experts)]
        for buffer in buffers:
            w = {k: torch.randn(cfg.expert_shapes[k], generator=gen) * 0.02 for k in ("w1", "w2", "w3")}
            fmt.pack(w["w1"], w["w2"], w["w3"], buffer)
        table = fmt.decode_table([fmt.unpack(b) for b in buffers])
        if table is None:
            raise SystemExit(f"{name}: no experts_decode kernel for these experts on this machine")
        tables[name] = (fmt, table, buffers)
    x = torch.randn(1, cfg.dim).bfloat16()
    weights = torch.full((1, cfg.top_k), 1 / cfg.top_k)
    times: dict[str, list[float]] = {name: [] for name in tables}
    for _ in range(args.rounds):
        for name, (_, table, _) in tables.items():
            ids = torch.randperm(args.experts, generator=gen)[: cfg.top_k].view(1, -1)
            start = time.perf_counter()
            table(x, weights, ids)
            times[name].append((time.perf_counter() - start) * 1e3)
    first = args.formats[0]
    for name, (fmt, _, _) in tables.items():
        t = times[name]
        ratio = statistics.median(times[first]) / statistics.median(t)
        print(f"{fmt.key:>14}: {fmt.expert_bytes / 2**20:6.2f} MiB an expert, {cfg.top_k} experts a call: "
              f"min {min(t):7.2f} ms, median {statistics.median(t):7.2f} ms, {ratio:.2f}x {first}'s speed (medians)")


if __name__ == "__main__":
    main()

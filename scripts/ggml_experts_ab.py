"""A GGUF's Q8_0/Q4_0 experts through moe-local's `experts_ggml` against the same shapes in moe-local's own int8
and int4 formats (`experts_swiglu*`): one MoE layer's k experts for a decode step (1 row each) and a few rows
each (a batch), interleaved rounds, the best of each. Random weights quantized by gguf-py.

    python scripts/ggml_experts_ab.py --dim 2048 --ffn 768 --experts 8 --rounds 5   # Qwen3-30B-A3B's widths
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from moe_local.config import preset_config
from moe_local.experts.formats import Ggml, Int4, Int8


def experts(fmt, qtype, cfg, n: int, rng) -> list:
    views = []
    for _ in range(n):
        buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
        gate_up = rng.standard_normal((2 * cfg.ffn_dim, cfg.dim)).astype(np.float32)
        down = rng.standard_normal((cfg.dim, cfg.ffn_dim)).astype(np.float32)
        if qtype is None:
            f = cfg.ffn_dim
            fmt.pack(*(torch.from_numpy(w).bfloat16() for w in (gate_up[:f], down, gate_up[f:])), buffer)
        else:
            fmt.write({"gate_up": torch.from_numpy(gguf.quants.quantize(gate_up, qtype)), "down": torch.from_numpy(gguf.quants.quantize(down, qtype))}, buffer)
        views.append(fmt.unpack(buffer))
    return views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(preset_config("tiny"), dim=args.dim, ffn_dim=args.ffn)
    rng = np.random.default_rng(0)
    formats = {"gguf-q8_0": (Ggml(cfg, T.Q8_0, T.Q8_0), T.Q8_0), "int8": (Int8(cfg, torch.bfloat16), None),
               "gguf-q4_0": (Ggml(cfg, T.Q4_0, T.Q4_0), T.Q4_0), "int4": (Int4(cfg, 32, "cpu"), None)}  # fmt: skip
    views = {name: experts(fmt, qtype, cfg, args.experts, rng) for name, (fmt, qtype) in formats.items()}
    print(f"| rows per expert | {' | '.join(formats)} | (ms for one layer's {args.experts} experts, best of {args.rounds}) |")
    for rows in (1, 4):
        x = torch.randn(rows * args.experts, cfg.dim).bfloat16()
        best = dict.fromkeys(formats, float("inf"))
        for _ in range(args.rounds):
            for name, (fmt, _) in formats.items():
                start = time.perf_counter()
                for _ in range(10):
                    fmt.forward_grouped(x, [rows] * args.experts, views[name])
                best[name] = min(best[name], (time.perf_counter() - start) / 10 * 1e3)
        print(f"| {rows} | {' | '.join(f'{best[name]:.2f}' for name in formats)} |")


if __name__ == "__main__":
    main()

"""A GGUF's Q8_0/Q4_0/Q4_K/Q6_K experts through moe-local's `experts_ggml` against the same shapes in moe-local's
own int8 and int4 formats (`experts_swiglu*`): one MoE layer's k experts for a decode step (1 row each) and a few
rows each (a batch), interleaved rounds, the best of each. Random weights quantized by gguf-py (Q8_0, Q4_0), or
random K-quant blocks with scales of a sensible size (gguf-py cannot quantize to those).

    python scripts/ggml_experts_ab.py --dim 2048 --ffn 768 --experts 8 --rounds 5   # Qwen3-30B-A3B's widths
    python scripts/ggml_experts_ab.py --dim 1024 --ffn 2816 --experts 8 --rows 128 --rounds 3   # a 512-token prefill's rows, top 2 of 8
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
            parts = {"gate_up": blocks(gate_up, qtype, rng), "down": blocks(down, qtype, rng), "types": torch.tensor([qtype, qtype], dtype=torch.uint8)}
            fmt.pack_native(lambda name: parts, buffer)
        views.append(fmt.unpack(buffer))
    return views


def blocks(values: np.ndarray, qtype: T, rng) -> torch.Tensor:
    """values [rows, n] as `qtype`'s blocks: gguf-py's quantization, or random K-quant blocks."""
    if qtype not in (T.Q4_K, T.Q5_K, T.Q6_K):
        return torch.from_numpy(gguf.quants.quantize(values, qtype))
    rows, n = values.shape
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, n // 256, size), dtype=np.uint8)
    scales = slice(208, 210) if qtype == T.Q6_K else slice(0, 4)
    raw[:, :, scales] = rng.uniform(1e-3, 4e-3, (rows, n // 256, (scales.stop - scales.start) // 2)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,4", help="rows per expert to time, comma-separated (a decode step's 1; a prefill's many)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(preset_config("tiny"), dim=args.dim, ffn_dim=args.ffn)
    rng = np.random.default_rng(0)
    formats = {"gguf-q8_0": (Ggml(cfg, [(T.Q8_0, T.Q8_0)]), T.Q8_0), "int8": (Int8(cfg, torch.bfloat16), None),
               "gguf-q4_0": (Ggml(cfg, [(T.Q4_0, T.Q4_0)]), T.Q4_0), "int4": (Int4(cfg, 32, "cpu"), None),
               "gguf-q4_k": (Ggml(cfg, [(T.Q4_K, T.Q4_K)]), T.Q4_K), "gguf-q6_k": (Ggml(cfg, [(T.Q6_K, T.Q6_K)]), T.Q6_K)}  # fmt: skip
    views = {name: experts(fmt, qtype, cfg, args.experts, rng) for name, (fmt, qtype) in formats.items()}
    print(f"| rows per expert | {' | '.join(formats)} | (ms for one layer's {args.experts} experts, best of {args.rounds}) |")
    for rows in (int(n) for n in args.rows.split(",")):
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

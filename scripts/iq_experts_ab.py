"""A GGUF's IQ2_XXS and IQ3_XXS experts through moe-local's `experts_ggml` (the file's blocks) against what they
were before it had those kernels: converted once at load to int4 in groups of 32 (`formats.gguf_format`'s choice
for types of at most 4.5 bits a weight), run by `experts_swiglu_int4`. One MoE layer's k experts for a decode step
(1 row each), a batch (4 rows each) and a prefill chunk (32 rows each), interleaved rounds, the best of each;
with --layers N each call takes the next of N layers' experts (N large enough that they do not fit in the CPU's
caches: read from RAM, as a large model's are).
Random blocks with scales of a sensible size (every bit pattern is one a file may hold; gguf-py cannot quantize
to the IQ types), random bf16 weights for int4.

    python scripts/iq_experts_ab.py --dim 2048 --ffn 768 --experts 8 --rounds 5   # Qwen3-30B-A3B's widths
    python scripts/iq_experts_ab.py --dim 4096 --ffn 1024 --experts 10 --layers 8  # Qwen3.5-397B-A17B's, from RAM
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
from moe_local.experts.formats import Ggml, Int4


def iq_blocks(rows: int, n: int, qtype: T, rng) -> torch.Tensor:
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, n // 256, size), dtype=np.uint8)
    raw[:, :, 0:2] = rng.uniform(-2e-3, 2e-3, (rows, n // 256, 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(rows, -1))


def experts(fmt, qtype, cfg, n: int, rng) -> list:
    views, f, d = [], cfg.ffn_dim, cfg.dim
    for _ in range(n):
        buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
        if qtype is None:
            fmt.pack(torch.randn(f, d).bfloat16() * 0.02, torch.randn(d, f).bfloat16() * 0.02, torch.randn(f, d).bfloat16() * 0.02, buffer)
        else:
            parts = {"gate_up": iq_blocks(2 * f, d, qtype, rng), "down": iq_blocks(d, f, qtype, rng), "types": torch.tensor([qtype, qtype], dtype=torch.uint8)}
            fmt.pack_native(lambda name: parts, buffer)
        views.append(fmt.unpack(buffer))
    return views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(preset_config("tiny"), dim=args.dim, ffn_dim=args.ffn)
    rng = np.random.default_rng(0)
    formats = {"gguf-iq2_xxs": (Ggml(cfg, [(T.IQ2_XXS, T.IQ2_XXS)]), T.IQ2_XXS), "gguf-iq3_xxs": (Ggml(cfg, [(T.IQ3_XXS, T.IQ3_XXS)]), T.IQ3_XXS),
               "int4 (g32)": (Int4(cfg, 32, "cpu"), None)}  # fmt: skip
    views = {name: [experts(fmt, qtype, cfg, args.experts, rng) for _ in range(args.layers)] for name, (fmt, qtype) in formats.items()}
    print(f"| rows per expert | {' | '.join(formats)} | iq2_xxs / int4 | iq3_xxs / int4 | (ms for one layer's {args.experts} experts, best of {args.rounds}, "
          f"{args.layers} layers in turn) |")
    for rows in (1, 4, 32):
        x = torch.randn(rows * args.experts, cfg.dim).bfloat16()
        best = dict.fromkeys(formats, float("inf"))
        repeat = max(10 if rows < 32 else 2, args.layers)
        for _ in range(args.rounds):
            for name, (fmt, _) in formats.items():
                start = time.perf_counter()
                for i in range(repeat):
                    assert fmt.forward_grouped(x, [rows] * args.experts, views[name][i % args.layers]) is not None
                best[name] = min(best[name], (time.perf_counter() - start) / repeat * 1e3)
        int4 = best["int4 (g32)"]
        print(f"| {rows} | {' | '.join(f'{best[name]:.2f}' for name in formats)} | {best['gguf-iq2_xxs'] / int4:.2f} | {best['gguf-iq3_xxs'] / int4:.2f} |")


if __name__ == "__main__":
    main()

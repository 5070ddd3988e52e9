"""`experts_swiglu_fp8` (the fp8 format's CPU kernel) against `experts_swiglu`'s int8 and bf16 experts, and against
another version of the kernels' source (`--against`: e.g. `git show main:moe_local/cpu_kernels.c > /tmp/old.c`):
one decode token's k experts, drawn from a pool at a preset's widths, one row each, the kernels called directly
(no mixing of their outputs, no Python between them), alternating call by call so that a busy machine's load falls
on all alike. Random weights: e4m3 bytes of a Gaussian scaled as a published block's (its largest near 448), so that
zeros and subnormals are as rare as in a published matrix. Prints each case's min and median ms a call.

    python scripts/fp8_kernel_ab.py --against /tmp/old.c --rounds 50
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moe_local import native
from moe_local.config import preset_config

P = ctypes.c_void_p


def build(source: Path, folder: Path, name: str) -> ctypes.CDLL:
    out = folder / f"{name}.so"
    subprocess.run(["cc", *native.FLAGS, str(source), "-o", str(out)], check=True)
    return ctypes.CDLL(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--against", type=Path, help="another cpu_kernels.c whose experts_swiglu_fp8 to time too")
    parser.add_argument("--experts", type=int, default=32, help="experts in the pool (the k are drawn among them)")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = preset_config(args.preset, 1)
    D, F, k, block = cfg.dim, cfg.ffn_dim, cfg.top_k, 128
    folder = Path(tempfile.mkdtemp())
    libs = {"fp8": build(native.SOURCE, folder, "this")}
    if args.against:
        libs["fp8 (--against)"] = build(args.against, folder, "against")
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)

    def e4m3(n: int, m: int) -> np.ndarray:
        return (torch.randn(n, m, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy().copy()

    def bf16(n: int, m: int) -> np.ndarray:
        return ((rng.standard_normal((n, m), dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)

    pool = range(args.experts)
    fp8 = [(e4m3(2 * F, D), e4m3(D, F), np.full((-(-2 * F // block), -(-D // block)), 1e-4, np.float32),
            np.full((-(-D // block), -(-F // block)), 1e-4, np.float32)) for _ in pool]  # fmt: skip
    int8 = [(rng.integers(-127, 128, (2 * F, D), dtype=np.int8), rng.integers(-127, 128, (D, F), dtype=np.int8),
             np.full(2 * F, 0x3C00, np.uint16), np.full(D, 0x3C00, np.uint16)) for _ in pool]  # fmt: skip
    bf = [(bf16(2 * F, D), bf16(D, F)) for _ in pool]
    x = bf16(k, D)
    y = np.zeros((k, D), np.float32)
    starts = (ctypes.c_int * (k + 1))(*range(k + 1))

    def table(experts, ids, part):
        return (P * k)(*[experts[i][part].ctypes.data for i in ids])

    cases = {name: (lambda ids, lib=lib: lib.experts_swiglu_fp8(
        P(x.ctypes.data), D, F, k, starts, table(fp8, ids, 0), table(fp8, ids, 1), table(fp8, ids, 2), table(fp8, ids, 3),
        block, block, P(y.ctypes.data), args.threads)) for name, lib in libs.items()}  # fmt: skip
    this = libs["fp8"]
    cases["int8"] = lambda ids: this.experts_swiglu(P(x.ctypes.data), D, F, k, starts, table(int8, ids, 0), table(int8, ids, 1),
                                                    table(int8, ids, 2), table(int8, ids, 3), P(y.ctypes.data), args.threads, 0)  # fmt: skip
    cases["bf16"] = lambda ids: this.experts_swiglu(P(x.ctypes.data), D, F, k, starts, table(bf, ids, 0), table(bf, ids, 1),
                                                    None, None, P(y.ctypes.data), args.threads, 0)  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, call in cases.items():
            ids = rng.permutation(args.experts)[:k]
            start = time.perf_counter()
            if call(ids) != 0:
                raise SystemExit(f"{name}: the kernel refused these sizes")
            times[name].append((time.perf_counter() - start) * 1e3)
    for name, t in times.items():
        print(f"{name:>16}: min {min(t):7.2f} ms, median {statistics.median(t):7.2f} ms")


if __name__ == "__main__":
    main()

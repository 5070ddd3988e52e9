"""A resident MLP (`DenseMLP`) on the CPU, bf16 (widened for a prefill where the CPU lacks bf16 arithmetic, as
`Transformer.widen_prefill` does) against `--resident-dtype` int8 and int4: one decode token, and a prefill chunk of
512 rows, at Gemma-4-26B-A4B's dense MLP's widths and Qwen3.6-35B-A3B's shared expert's (random weights), the three
interleaved over 4 rounds; min/median ms each.

    flock /work/wt/bench.lock python scripts/resident_mlp_ab.py
"""

from __future__ import annotations

import functools
import time

import torch

from moe_local import cpu_matmul
from moe_local.int4 import Int4Linear, group_for
from moe_local.int8 import Int8Linear
from moe_local.model import DenseMLP

CASES = {"gemma4 dense 2816x2112 gelu": (2816, 2112, "gelu_tanh"), "qwen3.6 shared 2048x512": (2048, 512, "silu")}


def mlp(d: int, f: int, act: str, dtype: str) -> DenseMLP:
    """A random bf16 MLP as the engine would hold it under `--resident-dtype` `dtype` (auto: "bf16")."""
    m = DenseMLP(d, f, act)
    torch.nn.init.normal_(m.w13.weight, std=0.02)
    torch.nn.init.normal_(m.w2.weight, std=0.02)
    m = m.to(torch.bfloat16)
    if dtype == "bf16" and cpu_matmul.widens_bf16():
        m.w13, m.w2 = cpu_matmul.WideLinear.of(m.w13), cpu_matmul.WideLinear.of(m.w2)
    elif dtype == "int8":
        m.quantize(Int8Linear.from_linear)
    elif dtype == "int4":
        m.quantize(functools.partial(Int4Linear.from_linear, group=group_for([(2 * f, d), (d, f)], "cpu")))
    return m


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    for name, (d, f, act) in CASES.items():
        mlps = {dtype: mlp(d, f, act, dtype) for dtype in ("bf16", "int8", "int4")}
        for rows, n in ((1, 40), (512, 2)):
            x = torch.randn(rows, d).bfloat16()
            times: dict[str, list[float]] = {k: [] for k in mlps}
            for _ in range(4):  # rounds, the three interleaved
                for k, m in mlps.items():
                    m(x)
                    t = time.perf_counter()
                    for _ in range(n):
                        m(x)
                    times[k].append((time.perf_counter() - t) / n * 1e3)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            print(f"{name}, {rows} row(s): " + ", ".join(f"{k} {min(v):.2f}/{med[k]:.2f} ms" for k, v in times.items()),
                  f"| int8/bf16 {med['int8'] / med['bf16']:.2f}, int4/bf16 {med['int4'] / med['bf16']:.2f} (medians)")


if __name__ == "__main__":
    main()

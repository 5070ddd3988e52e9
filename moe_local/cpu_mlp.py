"""A decode step's resident MLP on the CPU in one kernel call: a dense layer's, a shared expert, Gemma 4's dense
MLP beside its experts, in bf16, through the experts' kernel (`experts_swiglu` in `cpu_kernels.c`, the MLP as
one expert), where the torch operations are four calls and torch's one-row bf16 products: Gemma 4's 2816 x 2112
MLP for one row, weights cold, 2 threads, 1.93-2.13 ms against 2.38-2.64 (docs/measurements.md, 2026-12-03
session 3). Rounds where the torch operations round (each product, the activation, their product); the order
of the sums differs."""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from moe_local import native
from moe_local.cpu_matmul import WideLinear
from moe_local.experts.formats import KERNEL_ACTIVATIONS

MAX_ROWS = 16  # rows the kernel takes for one expert (EXPERT_MAX_ROWS): a decode or batch step's; a prefill's stay torch's


class Fused:
    """`model.DenseMLP`'s forward for up to MAX_ROWS bf16 rows: x [R, D] -> w2(act(gate) * up) [R, D], reading
    each weight once for the R rows."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, act: int):
        self.w13, self.w2, self.act = w13, w2, act  # [2F, D] gate rows then up rows, [D, F]
        self.dim, self.hidden = w2.shape

    @classmethod
    def build(cls, mlp) -> Fused | None:
        """For a `model.DenseMLP`; None where the kernel does not apply: no kernels, weights that are not plain
        bf16 (`--resident-dtype` int8 and int4 take their own kernels), biases, or sizes it does not take."""
        lib = native.library()
        linears = (mlp.w13, mlp.w2)
        if isinstance(lib, str) or any(type(m) not in (nn.Linear, WideLinear) or m.bias is not None for m in linears):
            return None
        w13, w2 = (m.weight.detach() for m in linears)
        D, F = w2.shape
        if (any(w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous() for w in (w13, w2))
                or w13.shape != (2 * F, D) or D % 32 or F % 32 or mlp.act not in KERNEL_ACTIVATIONS):  # fmt: skip
            return None
        return cls(w13, w2, KERNEL_ACTIVATIONS[mlp.act])

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [R, D] -> [R, D] bf16, or None where these rows are not the kernel's (then the torch operations run)."""
        if x.dtype != torch.bfloat16 or x.dim() != 2 or not 0 < x.shape[0] <= MAX_ROWS or x.device.type != "cpu":
            return None
        x, R = x.contiguous(), x.shape[0]
        y = torch.empty(R, self.dim, dtype=torch.float32)
        code = native.library().experts_swiglu(
            x.data_ptr(), self.dim, self.hidden, 1, (ctypes.c_int * 2)(0, R), (ctypes.c_void_p * 1)(self.w13.data_ptr()),
            (ctypes.c_void_p * 1)(self.w2.data_ptr()), None, None, y.data_ptr(), torch.get_num_threads(), self.act,
        )  # fmt: skip
        native.check(code, "dense MLP")
        return y.to(torch.bfloat16)

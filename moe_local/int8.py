"""Weight-only int8 with one scale per output channel (w ~ q * scale): quantizing a matrix, the matmul that
reads it, and `Int8Linear`, what `--resident-dtype int8` puts in place of the attention projections (for a
decode step's few rows on the CPU, moe-local's own kernel: `native.py`). The experts' int8 format
(`experts/formats.py`) packs the same two tensors into its buffer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_local import native

KERNEL_MAX_ROWS = 16  # rows `linear_kernel` takes: a decode step's (more: `linear`'s widened fp32 panels)
WIDEN_ROWS = 2048  # output channels `linear` widens to fp32 at a time for more rows than that (16 MB at a width of 2048)


def quantize(w: torch.Tensor, scale_dtype: torch.dtype, rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype, on any device) -> q int8 [N, K], scale [N] in `scale_dtype`; `rows` rows at a
    time, so that a vocabulary's lm_head (201k x 2880 for gpt-oss) is never whole in fp32."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    for start in range(0, w.shape[0], rows):
        part = w[start : start + rows].float()
        scale[start : start + rows] = (part.abs().amax(dim=1) / 127).clamp(min=1e-12).to(scale_dtype)
        q[start : start + rows] = (part / scale[start : start + rows].float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q * scale).T -> [M, N] in x's dtype."""
    if x.is_cuda:
        # torch's CUDA _weight_int8pack_mm took 1.6 ms per Mixtral expert for one token on an H100 (and
        # prefill ran at 39 tok/s); widening to the compute dtype and one matmul is several times faster.
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    if x.numel() > KERNEL_MAX_ROWS * x.shape[-1]:
        return _widened(x, q, scale)
    if x.dtype != scale.dtype:
        return torch._weight_int8pack_mm(x.to(scale.dtype), q, scale).to(x.dtype)
    return torch._weight_int8pack_mm(x, q, scale)


def _widened(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`linear` for a prefill's many rows on the CPU: WIDEN_ROWS output channels at a time widened to fp32 once
    and multiplied by all the rows in one fp32 matmul, the scale after. torch's `_weight_int8pack_mm` widens the
    weights again for each few rows: at 512 rows it took 1.5-1.9x this one's time (docs/measurements.md)."""
    xf = x.float()
    y = torch.empty(*x.shape[:-1], q.shape[0], dtype=x.dtype)
    for start in range(0, q.shape[0], WIDEN_ROWS):
        end = start + WIDEN_ROWS
        y[..., start:end] = F.linear(xf, q[start:end].float()) * scale[start:end].float()
    return y


def linear_kernel(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """`linear` by moe-local's `int8_linear` (AVX512-VNNI; ~1.25x torch's `_weight_int8pack_mm`, which widens
    every weight to fp32, for one row of 2048 x 1024: docs/measurements.md): bf16 x [..., K] on the CPU, at most
    KERNEL_MAX_ROWS rows, bf16 scales; x meets the weights as int16 (2^-15 of each row's largest value). None
    where it does not apply."""
    k, n = x.shape[-1], q.shape[0]
    rows = x.numel() // k if k else 0
    if x.is_cuda or x.dtype != torch.bfloat16 or scale.dtype != torch.bfloat16 or not 0 < rows <= KERNEL_MAX_ROWS or k % 32 or n % 8:
        return None
    lib = native.library()
    if isinstance(lib, str) or not lib.experts_int8:
        return None
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    native.check(lib.int8_linear(x.data_ptr(), rows, k, q.data_ptr(), scale.data_ptr(), n, y.data_ptr(), torch.get_num_threads()), "int8")
    return y


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, quantized from a float weight [N, K] where it lies; scales in the
    weight's dtype; the bias (if any) kept as it is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        q, scale = quantize(weight, weight.dtype)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_kernel(x, self.weight, self.scale)
        if y is None:
            y = linear(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

"""Weight-only int8 with one scale per output channel (w ~ q * scale): quantizing a matrix, the matmul that
reads it, and `Int8Linear`, what `--resident-dtype int8` puts in place of the attention projections. The
experts' int8 format (`experts/formats.py`) packs the same two tensors into its buffer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype, on any device) -> q int8 [N, K], scale [N] in `scale_dtype`."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(scale_dtype)  # [N]
    q = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q * scale).T -> [M, N] in x's dtype."""
    if x.is_cuda:
        # torch's CUDA _weight_int8pack_mm took 1.6 ms per Mixtral expert for one token on an H100 (and
        # prefill ran at 39 tok/s); widening to the compute dtype and one matmul is several times faster.
        return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    if x.dtype != scale.dtype:
        return torch._weight_int8pack_mm(x.to(scale.dtype), q, scale).to(x.dtype)
    return torch._weight_int8pack_mm(x, q, scale)


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
        y = linear(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

"""Which CPU kernel a bf16 matmul takes. oneDNN, torch's default for bf16 matmuls on the CPU, reads the
weights of a one-row product at half the speed of torch's own matrix-vector kernel (0.51 against 0.24 ms
for a 5632 x 1024 bf16 weight, 2 threads), and pays ~15 us per call on small matrices; from two rows up it
is as fast or faster (4x at 8 rows). So one-row products run with oneDNN off: every matmul of a one-token
step (`matmuls_for_rows`, which the engine wraps each step in), and in larger steps each expert that one
token was routed to (`linear`). fp16 and fp32 do not change; the two kernels round bf16 differently.
The switch is process-wide: the CPU channel's worker, which runs experts of the same step, follows it
too; nothing on CUDA reads it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


@contextmanager
def matmuls_for_rows(rows: int) -> Iterator[None]:
    """oneDNN off while a step of `rows` rows runs, if that is one (and it was on)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and rows > 1
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear, with oneDNN off for a product of one row on the CPU."""
    if x.shape[0] != 1 or x.is_cuda or not torch.backends.mkldnn.enabled:
        return F.linear(x, weight)
    torch.backends.mkldnn.enabled = False
    try:
        return F.linear(x, weight)
    finally:
        torch.backends.mkldnn.enabled = True

"""Which CPU kernel a bf16 matmul takes. oneDNN, torch's default for bf16 matmuls on the CPU, reads the
weights of a one-row product at half the speed of torch's own matrix-vector kernel (0.51 against 0.24 ms
for a 5632 x 1024 bf16 weight, 2 threads), and pays ~15 us per call on small matrices; from two rows up it
is as fast or faster (4x at 8 rows). So one-row products run with oneDNN off: every matmul of a one-token
step (the engine wraps each step in `matmuls_for_rows`), and on `--device cpu` each expert that one token
of a larger step was routed to (`InPlaceExperts`, which runs on one thread). fp16 and fp32 do not change;
the two kernels round bf16 differently. The switch is process-wide, so it is only flipped where no other
thread computes meanwhile: the CPU channel's worker, which runs experts inside a step, follows the step's
setting; nothing on CUDA reads it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def matmuls_for_rows(rows: int) -> Iterator[None]:
    """oneDNN off while a step of `rows` rows runs, if that is one (and it was on)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = before and rows > 1
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


"""Which CPU kernel a bf16 matmul takes. oneDNN, torch's default for bf16 matmuls on the CPU, reads the
weights of a one-row product at half the speed of torch's own matrix-vector kernel (0.51 against 0.24 ms
for a 5632 x 1024 bf16 weight, 2 threads), and pays ~15 us per call on small matrices; from two rows up it
is as fast or faster (4x at 8 rows). So one-row products run with oneDNN off: every matmul of a one-token
step (the engine wraps each step in `matmuls_for_rows`), and on `--device cpu` each expert that one token
of a larger step was routed to (`InPlaceExperts`, which runs on one thread); inside such a step, the
products that are not a one-row `F.linear` (attention by hand, DeepSeek's absorbed query) turn oneDNN back
on (`onednn`): torch's own kernel is slow for them at any size. fp16 and fp32 do not change;
the two kernels round bf16 differently. The switch is process-wide, so it is only flipped where no other
thread computes meanwhile: the CPU channel's worker, which runs experts inside a step, follows the step's
setting; nothing on CUDA reads it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def onednn(on_cpu: bool) -> Iterator[None]:
    """oneDNN on, whatever the step chose, around a product that is not a one-row `F.linear`: torch's own
    kernel is fast only for one row against an [N, K] weight, and far slower for a [K, N] weight or for
    several rows (2 threads, bf16: DeepSeek's absorbed query [16, 1, 128] @ [16, 128, 512], 746 us against
    165; gpt-oss's attention by hand, 8 queries per KV head over 1,024 positions, 2.8 ms against 0.07). Only
    where `on_cpu`: on CUDA the switch means nothing, and the CPU channel's worker may be computing (its
    experts are submitted and collected within a layer's expert call, so attention never overlaps them)."""
    with _mkldnn(on_cpu or torch.backends.mkldnn.enabled):
        yield


@contextmanager
def matmuls_for_rows(rows: int) -> Iterator[None]:
    """oneDNN off while a step of `rows` rows runs, if that is one (and it was on)."""
    with _mkldnn(torch.backends.mkldnn.enabled and rows > 1):
        yield


@contextmanager
def _mkldnn(enabled: bool) -> Iterator[None]:
    """The switch set to `enabled` while the block runs, then back to what it was."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


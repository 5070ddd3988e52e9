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
setting; nothing on CUDA reads it.

Without AVX512-BF16 (oneDNN then widens bf16 itself) a bf16 product of many rows, a prefill's, runs at a third
to half the speed of fp32's sgemm on the same numbers: `WideLinear` widens the weight to fp32 a tile at a time
and multiplies in fp32 (2-3x for Qwen3.6-35B-A3B's 512 x 2048 x 12352 input projection, 2 threads).

lm_head and the routers take moe-local's own kernel for a step's few rows (`rows_linear`): one weight read for all
of a batch step's rows, each row's sums its own."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from moe_local import native

WIDEN_MIN_ROWS = 32  # rows from which `WideLinear` widens (a prefill chunk's; a decode or batch step's stay on bf16)
WIDEN_TILE_BYTES = 2 << 20  # fp32 weight rows widened at once: in cache between widening and the sgemm that reads them


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


def widens_bf16() -> bool:
    """Whether this CPU lacks bf16 arithmetic (AVX512-BF16, AMX), so that oneDNN widens bf16 as it goes and a
    prefill's bf16 products are faster widened first (`WideLinear`); where it has it, oneDNN's bf16 is kept."""
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias) -> [..., N] in x's dtype, as fp32 products (sgemm) of x widened and the
    weight widened a tile of rows at a time; the sums are fp32's, as oneDNN's bf16 products sum, in another order."""
    lead, K, N = x.shape[:-1], x.shape[-1], weight.shape[0]
    xf = x.reshape(-1, K).float()  # [T, K]
    rows = max(16, WIDEN_TILE_BYTES // (4 * K))
    out = torch.empty(xf.shape[0], N, dtype=torch.float32)  # [T, N]
    for n in range(0, N, rows):
        torch.mm(xf, weight[n : n + rows].float().t(), out=out[:, n : n + rows])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*lead, N)


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [T, K] @ weight [N, K].T (+ bias), all bf16 on the CPU, for fewer than WIDEN_MIN_ROWS rows (a decode or batch
    step's): moe-local's `bf16_linear` kernel, which reads each weight once for the T rows and sums each row as it
    would alone, so that a batch's rows are its single rows bit for bit, where torch takes its own matrix-vector
    kernel for one row and oneDNN for more (~50 us a call for a router's [8, 192] weight and 8 rows, where the
    kernel takes ~6). None where it does not apply (dtypes, sizes: N a multiple of 8, K of 32; no kernels)."""
    T, (N, K) = x.shape[0], weight.shape
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.is_cuda or weight.is_cuda or x.dim() != 2 or not 0 < T < WIDEN_MIN_ROWS
            or N % 8 or K % 32 or not weight.is_contiguous() or (bias is not None and bias.dtype != torch.bfloat16)):  # fmt: skip
        return None
    lib = native.library()
    if isinstance(lib, str):
        return None
    x = x.contiguous()
    y = torch.empty(T, N, dtype=torch.bfloat16)
    code = lib.bf16_linear(x.data_ptr(), T, K, weight.data_ptr(), None if bias is None else bias.contiguous().data_ptr(), N, y.data_ptr(),
                           torch.get_num_threads())  # fmt: skip
    native.check(code, "bf16_linear")
    return y


class WideLinear(nn.Linear):
    """A bf16 `nn.Linear` on the CPU (the same weight) whose products of WIDEN_MIN_ROWS rows or more, a prefill's,
    run as `widened_linear`; fewer rows as before (`Transformer.widen_prefill` puts it in place)."""

    @classmethod
    def of(cls, linear: nn.Linear) -> WideLinear:
        with torch.device("meta"):
            wide = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        wide.weight, wide.bias = linear.weight, linear.bias
        return wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and not x.is_cuda and x.numel() >= WIDEN_MIN_ROWS * self.in_features:
            return widened_linear(x, self.weight, self.bias)
        return super().forward(x)

"""The MXFP4 matmuls (`weights/mxfp4.py` owns the format and its numerics): `linear` on the CPU (moe-local's
kernel for a few bf16 rows, else a byte lookup table and one matmul) and on CUDA (a Triton kernel for decode,
`mxfp4_triton.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_local import native
from moe_local.weights.mxfp4 import dequantize_fast

# CUDA: up to this many rows of x run in the Triton kernel, which reads W once per row (from L2 after the first);
# on an H200, 2880 x 2880: 8 rows 31 us, 16 rows 59 us, against 36 us to widen W + 10 us for the matmul
DECODE_MAX_ROWS = 8

CPU_CHUNK_ROWS = 1024  # rows of W widened at a time on the CPU: the chunk is still in cache for the matmul
NATIVE_MAX_ROWS = 16  # bf16 products of up to this many rows take moe-local's kernel (`native.py`)


def linear_cpu(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype: W widened `CPU_CHUNK_ROWS` rows at a time into a temporary in
    x's dtype (`dequantize_fast`; never the whole model, nor even one whole matrix), each chunk one matmul.

    Measured for M = 1 and a 2880 x 2880 matrix (gpt-oss's hidden and expert FFN size), one thread, CPU time
    (fp32 / bf16 x): the reference `dequantize` + F.linear 74 / 53 ms; the byte table on the whole matrix
    + F.linear 4.1 / 3.8 ms; the byte table in 1024-row chunks 3.3 / 2.6 ms (this); for scale, F.linear
    on the already widened matrix alone 1.4 / 0.6 ms. A 256-entry table of unscaled pairs times the
    scales and gathers of rows of 2 (`F.embedding`) were slower than the 1-d gather of pairs."""
    if x.dtype == torch.bfloat16 and x.shape[0] <= NATIVE_MAX_ROWS and blocks.shape[1] % 2 == 0:
        lib = native.library()
        if not isinstance(lib, str):
            return _linear_native(lib, x, blocks, scales)
    n = blocks.shape[0]
    if n <= CPU_CHUNK_ROWS:
        return F.linear(x, dequantize_fast(blocks, scales, x.dtype))
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    for r in range(0, n, CPU_CHUNK_ROWS):
        rows = slice(r, r + CPU_CHUNK_ROWS)
        y[:, rows] = F.linear(x, dequantize_fast(blocks[rows], scales[rows], x.dtype))
    return y


def _linear_native(lib, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`mxfp4_linear` of moe-local's CPU kernels (`native.py`): the weights widened to bf16 in registers, 32
    at a time, and multiplied as bf16 pairs (AVX512-BF16) or widened again to fp32; fp32 sums."""
    (m, k), n = x.shape, blocks.shape[0]
    x, y = x.contiguous(), torch.empty(m, n)
    assert blocks.is_contiguous() and scales.is_contiguous()
    code = lib.mxfp4_linear(x.data_ptr(), m, k, blocks.data_ptr(), scales.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    native.check(code, "mxfp4")
    return y.to(x.dtype)


def linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype, where x is: on CUDA, up to `DECODE_MAX_ROWS` rows run in the
    Triton kernel (reads the 4-bit weights once, fp32 accumulation), more rows widen W into a temporary in
    x's dtype (one Triton launch) and run one matmul (prefill: the matmul dominates, and the tensor cores
    want bf16)."""
    if not x.is_cuda:
        return linear_cpu(x, blocks, scales)
    from moe_local.experts import mxfp4_triton  # Triton is imported only where there is a GPU

    if x.shape[0] <= DECODE_MAX_ROWS:
        return mxfp4_triton.linear_decode(x, blocks, scales)
    return F.linear(x, mxfp4_triton.widen(blocks, scales, x.dtype))

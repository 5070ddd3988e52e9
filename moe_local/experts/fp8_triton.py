"""The CUDA decode matmul for FP8 experts (`moe_local/weights/fp8.py` owns the numerics): a Triton kernel that
reads the e4m3 bytes and the fp32 block scales of a decode token's experts straight from their slots, widens
them in registers and accumulates x @ W.T in fp32, one launch per matrix for all of the token's experts (as
`mxfp4_triton.linear_grouped` does for MXFP4). Imported only when a CUDA tensor needs it: Triton is not a
dependency of the CPU runtime. Unmeasured on a GPU so far; its tests run it in Triton's interpreter."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e4m3_times_2_8(byte):
    """e4m3 bytes (int32, 0..255) -> value * 2**-8 in fp32: the byte's sign, exponent and mantissa placed in an
    fp16's sign, low exponent and top mantissa bits make exactly that fp16 (subnormals included)."""
    bits = ((byte & 0x7F) << 7) | ((byte & 0x80) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _grouped_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr,  # x [G or 1, K]; w: e4m3 bytes [N, K] of slot slots[m]; s: fp32 [.., ceil(K / bk)]; y [G, N]
    N, K, M, BN, BK, stride_xm, stride_ym,  # M: rows of a sub-matrix (gate_up: F, its gate's then up's blocks); BN x BK blocks
    slots_ptr, stride_w, stride_s,  # row m's W lies slots[m] * stride_w bytes further on, its scales slots[m] * stride_s floats
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N rows of W (outputs) for one expert (program_id 1), walking K one block of BK
    columns at a time (BLOCK_K >= BK lanes, the rest masked); each block's products are summed, then scaled."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    slot = tl.load(slots_ptr + tl.program_id(1)).to(tl.int64)
    w_ptr += slot * stride_w
    s_ptr += slot * stride_s
    x_row = x_ptr + tl.program_id(1) * stride_xm
    row_ok = rows < N
    n_k = tl.cdiv(K, BK)
    scale_row = (rows // M) * tl.cdiv(M, BN) + (rows % M) // BN  # [BN]
    lanes = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(0, n_k):
        k = c * BK + lanes  # [BK]
        k_ok = (lanes < BK) & (k < K)
        byte = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0).to(tl.int32)
        x = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + scale_row * n_k + c, mask=row_ok, other=0.0)
        acc += tl.sum(_e4m3_times_2_8(byte) * x[None, :], axis=1) * s
    tl.store(y_ptr + tl.program_id(1) * stride_ym + rows, (acc * 256.0).to(y_ptr.dtype.element_ty), mask=row_ok)


BLOCK_N = 8  # rows of W per program; an untuned first choice (MXFP4's kernel measured 4..8 alike on an H200)


def linear_grouped(
    x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, stride_slot: int, n: int, rows: int,
    block: tuple[int, int],
) -> torch.Tensor:  # fmt: skip
    """Row m of x [G, K] (or the one row of x [1, K] for every m) @ W_m.T -> [G, N] in x's dtype, one launch for a
    decode token's G experts: W_m is the e4m3 [N, K] matrix at byte slots[m] * stride_slot of `weights`, its
    fp32 block scales at slots[m] * stride_slot bytes into `scales` (1-d uint8 views of a slot pool, each from
    the part's offset within a slot; slots int64 [G] on x's device), blocks of `block` over sub-matrices of
    `rows` rows (gate_up: the FFN size)."""
    g, k = slots.shape[0], x.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(g, n, dtype=x.dtype, device=x.device)
    bn, bk = block
    s = scales[: scales.numel() // 4 * 4].view(torch.float32)
    _grouped_kernel[(triton.cdiv(n, BLOCK_N), g)](
        x, weights, s, y, n, k, rows, bn, bk, x.stride(0) if x.shape[0] > 1 else 0, y.stride(0), slots, stride_slot, stride_slot // 4,
        BLOCK_N=BLOCK_N, BLOCK_K=triton.next_power_of_2(bk),
    )  # fmt: skip
    return y

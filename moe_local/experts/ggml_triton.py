"""The CUDA matmuls for a GGUF's experts in the file's own blocks (`weights/ggml.py` owns the numerics): Triton
kernels that read ggml blocks (every type `formats.Ggml` keeps: Q8_0, Q4_0, Q5_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
IQ4_XS, IQ2_XXS, IQ3_XXS) straight from an expert's slot, widen them in registers with gguf-py's fp32 operations
and either accumulate x @ W.T in fp32 (`linear_grouped`: one launch per matrix for all of a decode token's
experts, as `fp8_triton.linear_grouped` does for FP8) or write W out in x's dtype (`widen`: what a prefill's
matmul multiplies by). Each expert's buffer names its ggml type (the "types" part of `formats.Ggml`): the kernel
reads it from the slot and branches on it, so the host never waits for the device to learn a layer's types. The
activations are not rounded (llama.cpp's CUDA kernels round them to Q8_1 blocks first): exact arithmetic on the
file's values up to fp32 sums. Imported only when a CUDA tensor needs it: Triton is not a dependency of the CPU
runtime. Never run on a GPU so far; its tests run it in Triton's interpreter and compile it for sm_80/sm_90."""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from moe_local.weights import ggml

TYPES = tuple(GGMLQuantizationType[name] for name in ("Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS", "IQ2_XXS", "IQ3_XXS"))  # the branches of `_kernel`
# the tables of the IQ types, one uint8 tensor on the device: IQ2_XXS's grid [256, 8] from byte 0, IQ3_XXS's [256, 4]
# from IQ3_GRID, the 128 sign patterns from SIGNS, IQ4_TABLE's 16 values + 128 from IQ4_VALUES (`ggml.lattices`)
IQ3_GRID, SIGNS, IQ4_VALUES = tl.constexpr(2048), tl.constexpr(3072), tl.constexpr(3200)


@triton.jit
def _byte(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _half(ptr, mask):
    """The little-endian fp16 at each pointer (any shape) -> fp32."""
    bits = _byte(ptr, mask) | (_byte(ptr + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


# Each type's step: the values [BN, S, L] of S x L consecutive columns (from column k[0, 0]) of BN rows, each row's
# blocks starting at row_ptr [BN], and their columns k [S, L] with k_ok [S, L]. Blocks of 32 walk BLOCK_G blocks a
# step (S = BLOCK_G, L = 32); the others (K-quants, IQ types) one block of 256 a step (S sub-blocks of L values: the
# scales' grain).


@triton.jit
def _blocks32(row_ptr, row_ok, c, K, BYTES: tl.constexpr, BLOCK_G: tl.constexpr):
    """Step c of a type in blocks of 32 values of BYTES bytes, each opening with its fp16 d: the lanes [L], the
    columns k [S, L] and k_ok, the values' mask ok [BN, S, L], each block's start at [BN, S] and its d [BN, S]."""
    blk = c * BLOCK_G + tl.arange(0, BLOCK_G)  # [S]
    lane = tl.arange(0, 32)  # [L]
    k = blk[:, None] * 32 + lane[None, :]  # [S, L]
    k_ok = k < K
    ok = row_ok[:, None, None] & k_ok[None, :, :]
    blk_ok = row_ok[:, None] & (blk < K // 32)[None, :]  # [BN, S]
    at = row_ptr[:, None] + blk[None, :] * BYTES  # [BN, S]
    return lane, k, k_ok, ok, at, _half(at, blk_ok)


@triton.jit
def _q8_0(row_ptr, row_ok, c, K, BLOCK_G: tl.constexpr):
    """34 bytes a block: fp16 d, 32 int8 q; x = d * q."""
    lane, k, k_ok, ok, at, d = _blocks32(row_ptr, row_ok, c, K, 34, BLOCK_G)
    q = _byte(at[:, :, None] + 2 + lane[None, None, :], ok)
    q = (q ^ 128) - 128  # int8
    return d[:, :, None] * q.to(tl.float32), k, k_ok


@triton.jit
def _q4_0(row_ptr, row_ok, c, K, BLOCK_G: tl.constexpr):
    """18 bytes a block: fp16 d, 16 bytes whose low nibbles are values 0..15, high ones 16..31; x = d * (q - 8)."""
    lane, k, k_ok, ok, at, d = _blocks32(row_ptr, row_ok, c, K, 18, BLOCK_G)
    byte = _byte(at[:, :, None] + 2 + (lane % 16)[None, None, :], ok)
    q = ((byte >> (4 * (lane // 16))[None, None, :]) & 15) - 8
    return d[:, :, None] * q.to(tl.float32), k, k_ok


@triton.jit
def _q5_0(row_ptr, row_ok, c, K, BLOCK_G: tl.constexpr):
    """22 bytes a block: fp16 d, 4 bytes whose bit i is value i's fifth bit, 16 bytes of nibbles as Q4_0's;
    x = d * (q - 16)."""
    lane, k, k_ok, ok, at, d = _blocks32(row_ptr, row_ok, c, K, 22, BLOCK_G)
    fifth = (_byte(at[:, :, None] + 2 + (lane // 8)[None, None, :], ok) >> (lane % 8)[None, None, :]) & 1
    nibble = (_byte(at[:, :, None] + 6 + (lane % 16)[None, None, :], ok) >> (4 * (lane // 16))[None, None, :]) & 15
    q = (nibble | (fifth << 4)) - 16
    return d[:, :, None] * q.to(tl.float32), k, k_ok


@triton.jit
def _k4_scales(at, row_ok):
    """Q4_K's / Q5_K's 12 bytes of 6-bit scales and minimums at `at` [BN] -> sc, m [BN, 8] (`ggml._k4_scales`)."""
    s = tl.arange(0, 8)  # [8] sub-blocks
    ok = row_ok[:, None]
    first = s < 4
    p = _byte(at[:, None] + (s % 4)[None, :], ok)  # scale bytes 0..3
    q = _byte(at[:, None] + 4 + (s % 4)[None, :], ok)  # minimum bytes 4..7
    r = _byte(at[:, None] + 8 + (s % 4)[None, :], ok)  # bytes 8..11: sub-blocks 4..7's low bits
    sc = tl.where(first[None, :], p & 63, (r & 15) | ((p >> 6) << 4))
    m = tl.where(first[None, :], q & 63, (r >> 4) | ((q >> 6) << 4))
    return sc, m


@triton.jit
def _q45_k(row_ptr, row_ok, c, K, FIFTH: tl.constexpr):
    """Q4_K (144 bytes a block of 256: fp16 d and dmin, 12 bytes of scales, 128 of nibbles: the low ones of bytes
    32j.. are sub-block 2j, the high ones 2j + 1) or with FIFTH Q5_K (176: 32 bytes qh after the scales, bit s of
    qh[l] the fifth bit of value l of sub-block s); x = d * sc * q - dmin * m, sub-blocks of 32."""
    s = tl.arange(0, 8)  # [S]
    lane = tl.arange(0, 32)  # [L]
    k = c * 256 + s[:, None] * 32 + lane[None, :]  # [S, L]
    ok = row_ok[:, None, None]
    at = row_ptr + c * (176 if FIFTH else 144)  # [BN]
    d, dmin = _half(at, row_ok), _half(at + 2, row_ok)
    sc, m = _k4_scales(at + 4, row_ok)
    nibbles = 48 if FIFTH else 16
    byte = _byte(at[:, None, None] + nibbles + ((s // 2) * 32)[None, :, None] + lane[None, None, :], ok)
    q = (byte >> (4 * (s % 2))[None, :, None]) & 15
    if FIFTH:
        q = q | (((_byte(at[:, None, None] + 16 + lane[None, None, :], ok) >> s[None, :, None]) & 1) << 4)
    scale = d[:, None] * sc.to(tl.float32)  # [BN, S]: gguf-py's order, d * sc first
    low = dmin[:, None] * m.to(tl.float32)
    return scale[:, :, None] * q.to(tl.float32) - low[:, :, None], k, k < K


@triton.jit
def _q6_k(row_ptr, row_ok, c, K):
    """210 bytes a block of 256: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16 d; value
    v = 128h + r takes the nibble of byte 64h + r % 64 (the high one for r >= 64) and bits 2(r // 32) of byte
    32h + r % 32 of the pairs; x = d * scale * (q - 32), sub-blocks of 16."""
    s = tl.arange(0, 16)  # [S]
    lane = tl.arange(0, 16)  # [L]
    v = s[:, None] * 16 + lane[None, :]  # [S, L]
    h, r = v // 128, v % 128
    ok = row_ok[:, None, None]
    at = row_ptr + c * 210  # [BN]
    low = (_byte(at[:, None, None] + (h * 64 + r % 64)[None, :, :], ok) >> (4 * (r // 64))[None, :, :]) & 15
    high = (_byte(at[:, None, None] + (128 + h * 32 + r % 32)[None, :, :], ok) >> (2 * (r // 32))[None, :, :]) & 3
    q = (low | (high << 4)) - 32
    scales = _byte(at[:, None] + 192 + s[None, :], row_ok[:, None])
    scales = (scales ^ 128) - 128  # int8
    scale = _half(at + 208, row_ok)[:, None] * scales.to(tl.float32)  # [BN, S]
    k = c * 256 + v
    return scale[:, :, None] * q.to(tl.float32), k, k < K


@triton.jit
def _q2_k(row_ptr, row_ok, c, K):
    """84 bytes a block of 256: 16 bytes of a 4-bit scale sc (low) and minimum m (high) a sub-block of 16, 64 bytes
    of 2-bit q (value v = 128h + 32j + l: bits 2j of byte 32h + l), fp16 d and dmin; x = d * sc * q - dmin * m."""
    s = tl.arange(0, 16)  # [S]
    lane = tl.arange(0, 16)  # [L]
    v = s[:, None] * 16 + lane[None, :]  # [S, L]
    ok = row_ok[:, None, None]
    at = row_ptr + c * 84  # [BN]
    q = (_byte(at[:, None, None] + (16 + (v // 128) * 32 + v % 32)[None, :, :], ok) >> (2 * ((v % 128) // 32))[None, :, :]) & 3
    scales = _byte(at[:, None] + s[None, :], row_ok[:, None])  # [BN, S]
    scale = _half(at + 80, row_ok)[:, None] * (scales & 15).to(tl.float32)
    low = _half(at + 82, row_ok)[:, None] * (scales >> 4).to(tl.float32)
    k = c * 256 + v
    return scale[:, :, None] * q.to(tl.float32) - low[:, :, None], k, k < K


@triton.jit
def _q3_k(row_ptr, row_ok, c, K):
    """110 bytes a block of 256: 32 bytes of third bits (value v's: bit v // 32 of byte v % 32), 64 of 2-bit q as
    Q2_K's, 12 bytes of 6-bit scales (low nibbles of bytes 0..7 for sub-blocks 0..7, high ones for 8..15; 2 high
    bits each from bytes 8..11), fp16 d; x = d * (scale - 32) * (q - 4 where the third bit is 0), sub-blocks of 16."""
    s = tl.arange(0, 16)  # [S]
    lane = tl.arange(0, 16)  # [L]
    v = s[:, None] * 16 + lane[None, :]  # [S, L]
    ok = row_ok[:, None, None]
    at = row_ptr + c * 110  # [BN]
    q = (_byte(at[:, None, None] + (32 + (v // 128) * 32 + v % 32)[None, :, :], ok) >> (2 * ((v % 128) // 32))[None, :, :]) & 3
    third = (_byte(at[:, None, None] + (v % 32)[None, :, :], ok) >> (v // 32)[None, :, :]) & 1
    low = (_byte(at[:, None] + 96 + (s % 8)[None, :], row_ok[:, None]) >> (4 * (s // 8))[None, :]) & 15  # [BN, S]
    high = (_byte(at[:, None] + 104 + (s % 4)[None, :], row_ok[:, None]) >> (2 * (s // 4))[None, :]) & 3
    scale = _half(at + 108, row_ok)[:, None] * ((low | (high << 4)) - 32).to(tl.float32)
    k = c * 256 + v
    return scale[:, :, None] * (q - ((third ^ 1) << 2)).to(tl.float32), k, k < K


@triton.jit
def _iq4_xs(row_ptr, row_ok, c, K, tables_ptr):
    """136 bytes a block of 256: fp16 d, 2 bytes of each sub-block of 32's high 2 scale bits, 4 bytes of their low 4,
    128 bytes of 4-bit indices into IQ4_TABLE (a sub-block's 16 bytes: low nibbles its first 16 values);
    x = d * (scale - 32) * table[index]."""
    s = tl.arange(0, 8)  # [S]
    lane = tl.arange(0, 32)  # [L]
    at = row_ptr + c * 136  # [BN]
    low = (_byte(at[:, None] + 4 + (s // 2)[None, :], row_ok[:, None]) >> (4 * (s % 2))[None, :]) & 15  # [BN, S]
    high = (_byte(at[:, None] + 2 + (s // 4)[None, :], row_ok[:, None]) >> (2 * (s % 4))[None, :]) & 3
    scale = _half(at, row_ok)[:, None] * ((low | (high << 4)) - 32).to(tl.float32)
    index = _byte(at[:, None, None] + 8 + (s * 16)[None, :, None] + (lane % 16)[None, None, :], row_ok[:, None, None])
    value = _byte(tables_ptr + IQ4_VALUES + ((index >> (4 * (lane // 16))[None, None, :]) & 15), row_ok[:, None, None]) - 128  # [BN, S, L]
    k = c * 256 + s[:, None] * 32 + lane[None, :]
    return scale[:, :, None] * value.to(tl.float32), k, k < K


@triton.jit
def _iq_xxs(row_ptr, row_ok, c, K, tables_ptr, IQ3: tl.constexpr):
    """IQ2_XXS (66 bytes a block of 256: fp16 d, then 8 bytes a sub-block of 32: 4 indices into a grid of 8-value
    points, and a uint32 of 4 seven-bit indices into the sign patterns, a 4-bit scale s in its top bits;
    x = d * (0.5 + s) / 4 * grid value * sign) or with IQ3 IQ3_XXS (98: fp16 d, 64 bytes of indices into a grid of
    4-value points, 8 a sub-block, then the sub-blocks' uint32s as IQ2_XXS's; x = d * (0.5 + s) / 2 * ...). Value
    i of a sub-block takes sign pattern i // 8's bit i % 8."""
    s = tl.arange(0, 8)  # [S]
    lane = tl.arange(0, 32)  # [L]
    ok = row_ok[:, None, None]
    at = row_ptr + c * (98 if IQ3 else 66)  # [BN]
    aux_at = at[:, None] + ((66 + 4 * s) if IQ3 else (2 + 8 * s + 4))[None, :]  # [BN, S]: each sub-block's uint32
    aux = (_byte(aux_at, row_ok[:, None]) | (_byte(aux_at + 1, row_ok[:, None]) << 8) | (_byte(aux_at + 2, row_ok[:, None]) << 16)
           | (_byte(aux_at + 3, row_ok[:, None]).to(tl.int64) << 24))  # fmt: skip
    scale = _half(at, row_ok)[:, None] * (0.5 + (aux >> 28).to(tl.float32)) * (0.5 if IQ3 else 0.25)  # [BN, S]
    if IQ3:
        index = _byte(at[:, None, None] + 2 + (8 * s)[None, :, None] + (lane // 4)[None, None, :], ok)
        grid = _byte(tables_ptr + IQ3_GRID + index * 4 + (lane % 4)[None, None, :], ok)
    else:
        index = _byte(at[:, None, None] + 2 + (8 * s)[None, :, None] + (lane // 8)[None, None, :], ok)
        grid = _byte(tables_ptr + index * 8 + (lane % 8)[None, None, :], ok)
    pattern = ((aux[:, :, None] >> (7 * (lane // 8))[None, None, :]) & 127).to(tl.int32)  # [BN, S, L]
    negative = (_byte(tables_ptr + SIGNS + pattern, ok) >> (lane % 8)[None, None, :]) & 1
    k = c * 256 + s[:, None] * 32 + lane[None, :]
    return scale[:, :, None] * grid.to(tl.float32) * (1.0 - 2.0 * negative.to(tl.float32)), k, k < K


@triton.jit
def _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN: tl.constexpr):
    """A step's values [BN, S, L]: written to out [N, K] (WIDEN), else their products with x summed into acc [BN]."""
    if WIDEN:
        at = out_ptr + rows.to(tl.int64)[:, None, None] * K + k[None, :, :]
        tl.store(at, values.to(out_ptr.dtype.element_ty), mask=row_ok[:, None, None] & k_ok[None, :, :])
    else:
        x = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)  # [S, L]
        acc += tl.sum(tl.sum(values * x[None, :, :], axis=2), axis=1)
    return acc


@triton.jit
def _kernel(
    x_ptr, w_ptr, types_ptr, out_ptr,  # x [G or 1, K]; w: matrix of slot slots[g]; types: its ggml type's byte; out [G, N] or [N, K]
    tables_ptr,  # the IQ types' tables (`_tables`)
    N, K, stride_xm, stride_om,
    slots_ptr, stride_slot,  # program g's matrix and type byte lie slots[g] * stride_slot bytes further on
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, WIDEN: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N rows of W (outputs) for one expert (program_id 1), walking K one step at a time in the
    type the slot's buffer names (one branch for the whole program: its rows share a matrix)."""
    g = tl.program_id(1)
    slot = tl.load(slots_ptr + g).to(tl.int64)
    w_ptr += slot * stride_slot
    qtype = tl.load(types_ptr + slot * stride_slot).to(tl.int32)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    x_row = x_ptr + g * stride_xm
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # the type codes are GGMLQuantizationType's: Q8_0 8, Q4_0 2, Q5_0 6, Q4_K 12, Q5_K 13, Q6_K 14, Q2_K 10, Q3_K 11, IQ4_XS 23, IQ2_XXS 16, IQ3_XXS 18
    if qtype == 8:
        for c in range(0, tl.cdiv(K // 32, BLOCK_G)):
            values, k, k_ok = _q8_0(w_ptr + rows64 * (K // 32 * 34), row_ok, c, K, BLOCK_G)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 2:
        for c in range(0, tl.cdiv(K // 32, BLOCK_G)):
            values, k, k_ok = _q4_0(w_ptr + rows64 * (K // 32 * 18), row_ok, c, K, BLOCK_G)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 6:
        for c in range(0, tl.cdiv(K // 32, BLOCK_G)):
            values, k, k_ok = _q5_0(w_ptr + rows64 * (K // 32 * 22), row_ok, c, K, BLOCK_G)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 12:
        for c in range(0, K // 256):
            values, k, k_ok = _q45_k(w_ptr + rows64 * (K // 256 * 144), row_ok, c, K, False)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 13:
        for c in range(0, K // 256):
            values, k, k_ok = _q45_k(w_ptr + rows64 * (K // 256 * 176), row_ok, c, K, True)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 14:
        for c in range(0, K // 256):
            values, k, k_ok = _q6_k(w_ptr + rows64 * (K // 256 * 210), row_ok, c, K)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 10:
        for c in range(0, K // 256):
            values, k, k_ok = _q2_k(w_ptr + rows64 * (K // 256 * 84), row_ok, c, K)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 11:
        for c in range(0, K // 256):
            values, k, k_ok = _q3_k(w_ptr + rows64 * (K // 256 * 110), row_ok, c, K)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 23:
        for c in range(0, K // 256):
            values, k, k_ok = _iq4_xs(w_ptr + rows64 * (K // 256 * 136), row_ok, c, K, tables_ptr)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 16:
        for c in range(0, K // 256):
            values, k, k_ok = _iq_xxs(w_ptr + rows64 * (K // 256 * 66), row_ok, c, K, tables_ptr, False)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    elif qtype == 18:
        for c in range(0, K // 256):
            values, k, k_ok = _iq_xxs(w_ptr + rows64 * (K // 256 * 98), row_ok, c, K, tables_ptr, True)
            acc = _use(values, k, k_ok, rows, row_ok, x_row, out_ptr, K, acc, WIDEN)
    else:  # a type without a branch here: NaN, never a quiet zero
        acc += float("nan")
    if not WIDEN:
        tl.store(out_ptr + g * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


# rows of W a program and blocks of 32 a step for Q8_0/Q4_0/Q5_0 (K-quants take one block of 256 a step): an
# untuned first choice, as FP8's (MXFP4's kernel measured 4..8 rows alike on an H200)
BLOCK_N, BLOCK_G = 8, 8


@functools.cache
def _tables(device: torch.device) -> torch.Tensor:
    """The IQ types' tables as the kernel reads them, made once a device."""
    iq2, iq3, signs = ggml.lattices()
    assert (iq2.size, iq2.size + iq3.size, iq2.size + iq3.size + signs.size) == (IQ3_GRID, SIGNS, IQ4_VALUES)
    iq4 = np.array(ggml.IQ4_TABLE, dtype=np.int16) + 128
    return torch.from_numpy(np.concatenate([iq2.reshape(-1), iq3.reshape(-1), signs, iq4.astype(np.uint8)])).to(device)


def linear_grouped(
    x: torch.Tensor, weights: torch.Tensor, types: torch.Tensor, slots: torch.Tensor, stride_slot: int, n: int,
    block_n: int = BLOCK_N,
) -> torch.Tensor:  # fmt: skip
    """Row g of x [G, K] (or the one row of x [1, K] for every g) @ W_g.T -> [G, N] in x's dtype, one launch for a
    decode token's G experts: W_g is the [N, K] matrix of ggml blocks at byte slots[g] * stride_slot of `weights`,
    in the type whose code is the byte at slots[g] * stride_slot of `types` (1-d uint8 views of a slot pool, from
    the parts' offsets within a slot; slots int64 [G] on x's device; stride_slot 0 with slots of zeros: one
    matrix for every row). fp32 sums; the type must be one of `TYPES`, and K whole blocks of it."""
    g, k = slots.shape[0], x.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(g, n, dtype=x.dtype, device=x.device)
    _kernel[(triton.cdiv(n, block_n), g)](
        x, weights, types, y, _tables(x.device), n, k, x.stride(0) if x.shape[0] > 1 else 0, y.stride(0), slots, stride_slot,
        BLOCK_N=block_n, BLOCK_G=BLOCK_G, WIDEN=False,
    )  # fmt: skip
    return y


def widen(weights: torch.Tensor, types: torch.Tensor, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] matrix of ggml blocks at the start of `weights` (uint8), in the type whose code is types[0], as
    values in `dtype` [N, K], one launch: what a prefill's matmul multiplies by (gguf-py's values, rounded once
    to `dtype`)."""
    w = torch.empty(n, k, dtype=dtype, device=weights.device)
    slots = torch.zeros(1, dtype=torch.int64, device=weights.device)
    _kernel[(triton.cdiv(n, BLOCK_N), 1)](
        w, weights, types, w, _tables(w.device), n, k, 0, 0, slots, 0, BLOCK_N=BLOCK_N, BLOCK_G=BLOCK_G, WIDEN=True,
    )  # fmt: skip
    return w

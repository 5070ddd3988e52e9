"""MXFP4, the format of gpt-oss's published experts: 4-bit E2M1 values, two per byte, and one E8M0 exponent
per 32 values along the input dimension. This module owns the numerics: `quantize`, the reference
`dequantize` (bit-identical to transformers' `convert_moe_packed_tensors`), `dequantize_fast` (the same bits by
one table lookup per byte), `mxfp4_bytes`; the matmuls are `experts/mxfp4.py`'s.

Layout, for one matrix W [N, K] in our runtime's F.linear orientation (`y = x @ W.T`, rows = outputs):
    blocks uint8 [N, K/32, 16]: byte j of block g of row n holds W[n, 32g + 2j] in its low nibble and
                                W[n, 32g + 2j + 1] in its high nibble (E2M1 codes, FP4_VALUES below)
    scales uint8 [N, K/32]:     W[n, 32g : 32g + 32] = value * 2**(scales[n, g] - 127)
One expert of the checkpoint is exactly this, with no transpose: `mlp.experts.gate_up_proj_blocks[e]`
([2F, D/32, 16]) is W_gate_up [2F, D], whose row 2i is gate unit i and row 2i + 1 up unit i (interleaved,
not gate rows then up rows as our dense formats keep them); `down_proj_blocks[e]` ([D, F/32, 16]) is
W_down [D, F]. transformers dequantizes them into the transposes, [E, D, 2F] and [E, F, D], because its
experts compute `x @ W`.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 32  # values sharing one scale
SCALE_BIAS = 127  # E8M0: the byte s stands for 2**(s - 127); 255 would be NaN and is never written
# E2M1 code -> value: bit 3 is the sign, bits 2..1 the exponent, bit 0 the mantissa (OCP MX spec).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0


def mxfp4_bytes(n: int, k: int) -> int:
    """Bytes of one [N, K] matrix: blocks (half a byte per weight) + scales (a byte per 32): 4.25 bits."""
    return n * k // 2 + n * k // BLOCK


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales are uint8, not {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 3 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:2] != scales.shape:
        shapes = f"{tuple(blocks.shape)}, {tuple(scales.shape)}"
        raise ValueError(f"MXFP4 blocks [N, K/32, 16] and scales [N, K/32] do not match: {shapes}")


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype and device, K a multiple of 32) -> blocks uint8 [N, K/32, 16], scales uint8
    [N, K/32], as triton_kernels' `downcast_to_mxfp_torch` does it (what transformers uses to quantize
    gpt-oss's experts to MXFP4):

    - scale: the smallest power of two with amax / scale <= 6, i.e. 2**ceil(log2(amax / 6)), so that no
      value of the block is clipped. The OCP MX spec's 2**(floor(log2(amax)) - 2) is the same except when
      amax's mantissa is above 1.5 (amax in (6, 8) * 2**e), where it clips the block's largest values to 6.
    - value: round w / scale to the nearest E2M1 value, ties away from zero (the sign is kept, -0 too).
    """
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}, not {k}")
    groups = w.float().contiguous().view(n, k // BLOCK, BLOCK)  # [N, G, 32]
    amax = groups.abs().amax(dim=-1)  # [N, G]
    # round amax / 6 up to a power of two on its bits: the exponent field, plus one unless the mantissa is 0
    bits = (amax / FP4_MAX).view(torch.int32)
    exponent = ((bits + 0x7FFFFF) >> 23).clamp(max=254)  # [N, G]: the E8M0 byte (0 for an all-zero block)
    scaled = torch.ldexp(groups, SCALE_BIAS - exponent[..., None])  # exact: a power of two
    magnitude = scaled.abs().clamp(max=FP4_MAX)
    # index of the nearest of 0, .5, 1, 1.5, 2, 3, 4, 6; a midpoint goes up (right=True)
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=w.device)
    code = torch.bucketize(magnitude, midpoints, right=True).to(torch.uint8)  # [N, G, 32] in 0..7
    code |= torch.signbit(scaled).to(torch.uint8) << 3
    blocks = code[..., 0::2] | code[..., 1::2] << 4  # [N, G, 16]: even k in the low nibble
    return blocks.contiguous(), exponent.to(torch.uint8)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference: blocks [N, K/32, 16], scales [N, K/32] -> W [N, K] in `dtype` (every MXFP4 value is
    exact in bf16 and fp32; fp16 overflows above 2**15 * 6 as transformers' conversion does)."""
    _check(blocks, scales)
    n, g, _ = blocks.shape
    lut = torch.tensor(FP4_VALUES, device=blocks.device)
    codes = torch.stack([blocks & 0xF, blocks >> 4], dim=-1)  # [N, G, 16, 2]: (low, high) = (even k, odd k)
    values = lut[codes.long()].view(n, g, BLOCK)  # [N, G, 32]
    # ldexp computes values * 2.0**exponent in fp32, as transformers does, so the bits agree
    return torch.ldexp(values, scales.int()[..., None] - SCALE_BIAS).view(n, g * BLOCK).to(dtype)


_PAIR = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}  # two weights


@functools.lru_cache(maxsize=8)
def _byte_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256 * 256] of `_PAIR[dtype]`: entry 256 * s + b holds the two weights of byte b under scale s (low
    nibble first), as the bits of two `dtype` values; 256 KiB for bf16."""
    s = torch.arange(256, device=device).repeat_interleave(256)  # [65536]
    b = torch.arange(256, device=device).repeat(256)  # [65536]
    lut = torch.tensor(FP4_VALUES, device=device)
    values = lut[torch.stack([b & 0xF, b >> 4], dim=-1)]  # [65536, 2]
    pairs = torch.ldexp(values, s[:, None] - SCALE_BIAS).to(dtype)  # as `dequantize` computes them
    return pairs.view(_PAIR[dtype]).view(-1)


def dequantize_fast(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same bits as `dequantize`, in two passes: an int32 index per byte (its scale, its value), then
    one gather of a pair of weights per byte from `_byte_table` (a 1-d `index_select` of 32- or 64-bit
    entries: several times faster on the CPU than gathering rows of two)."""
    _check(blocks, scales)
    n, g, _ = blocks.shape
    index = blocks.int().add_(scales.int()[..., None] << 8)  # [N, G, 16]; add_, not |: 50x faster on the CPU
    return _byte_table(dtype, blocks.device).index_select(0, index.view(-1)).view(dtype).view(n, g * BLOCK)

"""ggml's block numerics: how many bytes a row of n values takes in each ggml type, and those bytes back to
values (the reference dequantization). The types moe-local keeps as they are (`experts/formats.py`'s `Ggml`:
Q8_0, Q4_0, Q5_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, IQ2_XXS, IQ3_XXS) and the float types are decoded here in torch, on any device, with the same fp32
operations as gguf-py (so the same values, bit for bit); every other type by the `gguf` package's numpy code
(`gguf.quants.dequantize`, the format's own library).

Q8_0: blocks of 32 values along a row, each an fp16 scale d then 32 int8 q: x = d * q (34 bytes).
Q4_0: blocks of 32, an fp16 scale d then 16 bytes: x[j] = d * ((byte[j] & 15) - 8), x[j + 16] = d * ((byte[j] >> 4) - 8) (18 bytes).
Q5_0: blocks of 32, an fp16 scale d, 4 bytes whose bit i is value i's fifth bit, 16 bytes of nibbles as Q4_0's:
  x = d * (q - 16) (22 bytes).
Q2_K: blocks of 256 in 16 sub-blocks of 16: 16 bytes of a 4-bit scale sc and a 4-bit minimum m each, 64 bytes of
  2-bit q (half h's bits 2j of byte l: value 128h + 32j + l), fp16 d and dmin: x = d * sc * q - dmin * m (84 bytes).
Q3_K: blocks of 256 in 16 sub-blocks of 16: 32 bytes of third bits, 64 of 2-bit q (as Q2_K's), 12 bytes of 6-bit
  scales (+ 32), fp16 d: x = d * (scale - 32) * (q + 4 * third - 4) (110 bytes).
Q4_K: blocks of 256 in 8 sub-blocks of 32: fp16 d and dmin, 12 bytes of 6-bit scales sc and minimums m (one each
  a sub-block), 128 bytes of nibbles (chunk j of 64 values: the low nibbles of bytes 32j.. are sub-block 2j, the
  high ones 2j + 1): x = d * sc * q - dmin * m (144 bytes).
Q5_K: as Q4_K with a fifth bit: 32 bytes qh after the scales, bit s of qh[l] is value l of sub-block s's (176 bytes).
Q6_K: blocks of 256 in 16 sub-blocks of 16: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, fp16
  d: x = d * scale * (q - 32), q of 6 bits (210 bytes).
IQ4_XS: blocks of 256 in 8 sub-blocks of 32: fp16 d, 2 bytes of each sub-block's high 2 scale bits, 4 bytes of their
  low 4, 128 bytes of 4-bit indices (a sub-block's 16 bytes: low nibbles its first 16 values) into IQ4_TABLE:
  x = d * (scale - 32) * IQ4_TABLE[index] (136 bytes).
IQ2_XXS: blocks of 256 in 8 sub-blocks of 32: fp16 d, then 8 bytes a sub-block: 4 indices into a grid of 256 points
  of 8 positive values (`lattices`), and a uint32 of 4 seven-bit indices into the 128 sign patterns (one a grid
  point; the eighth sign makes the count of minus signs even) with a 4-bit scale s in its top bits:
  x = d * (0.5 + s) / 4 * grid value * sign (66 bytes).
IQ3_XXS: blocks of 256 in 8 sub-blocks of 32: fp16 d, 64 bytes of indices into a grid of 256 points of 4 positive
  values (8 a sub-block), 8 uint32s of sign indices and scale as IQ2_XXS's: x = d * (0.5 + s) / 2 * grid value * sign
  (98 bytes).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants

from moe_local.weights.gguf import row_bytes  # noqa: F401  (a row's bytes, with the numerics)

FLOATS = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}
Q8_0, Q4_0, Q5_0, IQ4_XS = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.IQ4_XS
IQ4_TABLE = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL's and IQ4_XS's values
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K
IQ2_XXS, IQ3_XXS = GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ3_XXS


@functools.cache
def lattices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQ2_XXS's grid uint8 [256, 8], IQ3_XXS's [256, 4] and the 128 sign patterns uint8 [128] (bit j set: value j
    negative): data of the format, as gguf-py (llama.cpp's own tables) holds them."""
    grids = []
    for quant in (quants.IQ2_XXS, quants.IQ3_XXS):
        quant.init_grid()
        grids.append(np.ascontiguousarray(np.asarray(quant.grid).reshape(quant.grid_shape).astype(np.uint8)))
    return grids[0], grids[1], np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).copy()


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block [B, bytes] -> fp32 [B, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _bits(q: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """uint8 [B, n, m] -> [B, n, len(shifts), m]: (q >> shift) & mask for each shift (gguf-py's broadcast)."""
    return (q.unsqueeze(2) >> torch.tensor(shifts, dtype=torch.uint8, device=q.device).view(1, 1, -1, 1)) & mask


def _k4_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's / Q5_K's 12 bytes [B, 12] -> the 8 scales and 8 minimums [B, 8] each (6 bits)."""
    d, m, m_d = scales.view(-1, 3, 4).unbind(1)  # [B, 4] each
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mins


def _iq_xxs(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """IQ2_XXS or IQ3_XXS blocks [B, bytes] -> values [B, 256] fp32."""
    n, device = blocks.shape[0], blocks.device
    iq2, iq3, ksigns = (torch.from_numpy(t).to(device) for t in lattices())
    if qtype == IQ2_XXS:
        sub = blocks[:, 2:].reshape(n, 8, 8)  # [B, 8 sub-blocks, 4 grid indices + their uint32]
        grid = iq2.float()[sub[:, :, :4].long()].view(n, 8, 32)
        aux = sub[:, :, 4:].contiguous().view(torch.int32).view(n, 8).long() & 0xFFFFFFFF
    else:
        grid = iq3.float()[blocks[:, 2:66].long()].view(n, 8, 32)  # [B, 8, 8 indices x 4 values]
        aux = blocks[:, 66:].contiguous().view(torch.int32).view(n, 8).long() & 0xFFFFFFFF
    db = _half(blocks, 0).view(n, 1) * (0.5 + (aux >> 28).float()) * (0.25 if qtype == IQ2_XXS else 0.5)  # [B, 8]
    patterns = ksigns[(aux.unsqueeze(2) >> torch.tensor([0, 7, 14, 21], device=device)) & 127]  # [B, 8, 4]
    negative = _bits(patterns, list(range(8)), 0x01).transpose(2, 3).reshape(n, 8, 32)  # [B, 8, 32]: bit j of pattern l is value 8l + j's
    signs = 1.0 - 2.0 * negative.float()
    return (db.unsqueeze(2) * grid * signs).view(n, 256)


def _k_quant(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """K-quant blocks [B, bytes] -> values [B, 256] fp32."""
    n = blocks.shape[0]
    if qtype in (IQ2_XXS, IQ3_XXS):
        return _iq_xxs(blocks, qtype)
    if qtype == IQ4_XS:
        high = blocks[:, 2:4].contiguous().view(torch.int16).int()  # [B, 1]: 2 bits a sub-block of 32
        shifts = torch.arange(0, 16, 2, device=blocks.device, dtype=torch.int32)
        scales = (_bits(blocks[:, 4:8].unsqueeze(1), [0, 4], 0x0F).transpose(2, 3).reshape(n, 8).int() | (((high >> shifts) & 3) << 4)) - 32
        dl = (_half(blocks, 0) * scales.float()).view(n, 8, 1)
        index = _bits(blocks[:, 8:].reshape(n, 8, 16), [0, 4], 0x0F).reshape(n, 8, 32).long()
        table = torch.tensor(IQ4_TABLE, dtype=torch.float32, device=blocks.device)
        return (dl * table[index]).view(n, 256)
    if qtype == Q2_K:
        scales = blocks[:, :16]
        dl = (_half(blocks, 80) * (scales & 0xF).float()).view(n, 16, 1)
        ml = (_half(blocks, 82) * (scales >> 4).float()).view(n, 16, 1)
        q = _bits(blocks[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 16, 16).float()
        return (dl * q - ml).view(n, 256)
    if qtype == Q3_K:
        low = _bits(blocks[:, 96:104].reshape(n, 1, 8), [0, 4], 0x0F).reshape(n, 16)
        high = _bits(blocks[:, 104:108].reshape(n, 1, 4), [0, 2, 4, 6], 0x03).reshape(n, 16)
        dl = (_half(blocks, 108) * ((low | (high << 4)).view(torch.int8) - 32).float()).view(n, 16, 1)
        q = _bits(blocks[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 16, 16)
        third = _bits(blocks[:, :32].reshape(n, 1, 32), list(range(8)), 0x01).reshape(n, 16, 16)
        return (dl * (q.view(torch.int8) - ((third ^ 1) << 2).view(torch.int8)).float()).view(n, 256)
    if qtype == Q6_K:
        ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208].contiguous().view(torch.int8).float()
        d = (_half(blocks, 208) * scales).view(n, 16, 1)
        low = _bits(ql.reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
        high = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 8, 32)
        q = ((low | (high << 4)).view(torch.int8) - 32).reshape(n, 16, 16).float()
        return (d * q).view(n, 256)
    sc, mins = _k4_scales(blocks[:, 4:16])
    d = (_half(blocks, 0) * sc.float()).view(n, 8, 1)
    dm = (_half(blocks, 2) * mins.float()).view(n, 8, 1)
    qs = blocks[:, -128:]
    q = _bits(qs.reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    if qtype == Q5_K:
        q = q | (_bits(blocks[:, 16:48].reshape(n, 1, 32), list(range(8)), 0x01).reshape(n, 8, 32) << 4)
    return (d * q.float() - dm).view(n, 256)


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, n: int) -> torch.Tensor:
    """uint8 [..., row_bytes(qtype, n)] -> float32 [..., n]: every row's values."""
    lead = raw.shape[:-1]
    if qtype in FLOATS:
        return raw.contiguous().view(FLOATS[qtype]).float().view(*lead, n)
    if qtype == Q8_0:
        blocks = raw.contiguous().view(-1, 34)  # [B, 34]
        q = blocks[:, 2:].contiguous().view(torch.int8).float()  # [B, 32]
        return (_half(blocks, 0) * q).view(*lead, n)
    if qtype == Q4_0:
        blocks = raw.contiguous().view(-1, 18)  # [B, 18]
        q = blocks[:, 2:]  # [B, 16]
        values = torch.cat([q & 15, q >> 4], dim=1).float() - 8  # [B, 32]: low nibbles are the first 16
        return (_half(blocks, 0) * values).view(*lead, n)
    if qtype == Q5_0:
        blocks = raw.contiguous().view(-1, 22)  # [B, 22]
        q = blocks[:, 6:]  # [B, 16]
        fifth = _bits(blocks[:, 2:6].unsqueeze(1), list(range(8)), 0x01).transpose(2, 3).reshape(-1, 32)  # [B, 32]: bit i of the 4 bytes
        values = (torch.cat([q & 15, q >> 4], dim=1) | (fifth << 4)).view(torch.int8) - 16  # [B, 32]
        return (_half(blocks, 0) * values.float()).view(*lead, n)
    if qtype in (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, IQ2_XXS, IQ3_XXS):
        return _k_quant(raw.contiguous().view(-1, row_bytes(qtype, 256)), qtype).view(*lead, n)
    values = quants.dequantize(np.ascontiguousarray(raw.numpy()), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(*lead, n)

"""ggml's block numerics: how many bytes a row of n values takes in each ggml type, and those bytes back to
values (the reference dequantization). F32, F16, BF16, Q8_0 and Q4_0 are decoded here in torch (the formats
moe-local keeps as they are: `experts/formats.py`'s `Ggml`); every other type by the `gguf` package's numpy
code (`gguf.quants.dequantize`), the format's own library.

Q8_0: blocks of 32 values along a row, each an fp16 scale d then 32 int8 q: x = d * q (34 bytes).
Q4_0: blocks of 32, an fp16 scale d then 16 bytes: x[j] = d * ((byte[j] & 15) - 8), x[j + 16] = d * ((byte[j] >> 4) - 8) (18 bytes).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants

from moe_local.weights.gguf import row_bytes  # noqa: F401  (a row's bytes, with the numerics)

FLOATS = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}
Q8_0, Q4_0 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, n: int) -> torch.Tensor:
    """uint8 [..., row_bytes(qtype, n)] -> float32 [..., n]: every row's values."""
    lead = raw.shape[:-1]
    if qtype in FLOATS:
        return raw.contiguous().view(FLOATS[qtype]).float().view(*lead, n)
    if qtype == Q8_0:
        blocks = raw.contiguous().view(-1, 34)  # [B, 34]
        d = blocks[:, :2].contiguous().view(torch.float16).float()  # [B, 1]
        q = blocks[:, 2:].contiguous().view(torch.int8).float()  # [B, 32]
        return (d * q).view(*lead, n)
    if qtype == Q4_0:
        blocks = raw.contiguous().view(-1, 18)  # [B, 18]
        d = blocks[:, :2].contiguous().view(torch.float16).float()  # [B, 1]
        q = blocks[:, 2:]  # [B, 16]
        values = torch.cat([q & 15, q >> 4], dim=1).float() - 8  # [B, 32]: low nibbles are the first 16
        return (d * values).view(*lead, n)
    values = quants.dequantize(np.ascontiguousarray(raw.numpy()), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(*lead, n)

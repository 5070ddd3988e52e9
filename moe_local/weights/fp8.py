"""FP8 block-scaled weights as DeepSeek-V3, Qwen3-FP8, GLM-4.5-FP8 and MiniMax-M2 publish them: a matrix
[N, K] in float8 e4m3 and, beside it, `<name>_scale_inv` [ceil(N / bn), ceil(K / bk)], one scale per block of
bn x bk (w = q * scale_inv; the last blocks of a row or column may be ragged). The scales are fp32, or
power-of-two UE8M0 (`scale_fmt: ue8m0`, newer DeepSeek releases), stored as fp32 or as F8_E8M0 bytes: both
are read as fp32, exactly. Here: the config record, quantizing, the reference dequantization and the shape
check."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_local.errors import CheckpointError, ConfigError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu, torch.bfloat16, torch.float16)
DEQUANTIZE_ROWS = 4096  # rows dequantized at a time: the fp32 temporary of a large matrix stays small


@dataclass(frozen=True)
class Fp8Blocks:
    """config.json's `quantization_config` for `quant_method: fp8`."""

    block: tuple[int, int]  # (bn, bk): rows and columns a scale covers
    ue8m0: bool = False  # the scales are powers of two

    @classmethod
    def from_config(cls, quant: dict) -> Fp8Blocks:
        if quant.get("fmt", "e4m3") != "e4m3":
            raise ConfigError(f"unsupported fp8 quantization_config.fmt {quant['fmt']!r} (e4m3)")
        if quant.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"unsupported fp8 activation_scheme {quant['activation_scheme']!r}: static activation scales (dynamic)")
        block = quant.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"fp8 quantization_config.weight_block_size must be two positive integers, not {block!r} "
                              "(per-tensor fp8 scales are not supported)")  # fmt: skip
        fmt = quant.get("scale_fmt") or "float"
        if fmt not in ("float", "ue8m0"):
            raise ConfigError(f"unsupported fp8 quantization_config.scale_fmt {fmt!r} (float, ue8m0)")
        return cls((block[0], block[1]), fmt == "ue8m0")

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def check(self, name: str, shape: tuple[int, ...], scale_name: str, scale_shape: tuple[int, ...] | None, scale_dtype) -> None:
        """CheckpointError where FP8 tensor `name` has no scale, or one of the wrong shape or dtype."""
        if len(shape) != 2:
            raise CheckpointError(f"tensor {name} is float8 with shape {list(shape)}; only matrices can be FP8 blocks")
        if scale_shape is None:
            raise CheckpointError(f"tensor {name} is float8 but the checkpoint has no {scale_name} beside it")
        want = self.scale_shape(shape)
        if tuple(scale_shape) != want:
            raise CheckpointError(f"{scale_name} has shape {list(scale_shape)}, but {name} {list(shape)} in blocks of "
                                  f"{list(self.block)} (weight_block_size) needs {list(want)}")  # fmt: skip
        if scale_dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{scale_name} has dtype {scale_dtype}; FP8 block scales are F32 (or UE8M0, BF16, F16)")


def quantize(w: torch.Tensor, block: tuple[int, int], ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> q [N, K] e4m3 and scale_inv [ceil(N / bn), ceil(K / bk)] fp32, each block's largest value
    at e4m3's largest (448), or below it with a power-of-two scale (`ue8m0`)."""
    n, k = w.shape
    bn, bk = block
    sn, sk = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(sn * bn, sk * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(sn, bn, sk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp(min=2.0**-126)  # [sn, sk]
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.view(sn * bn, sk * bk)[:n, :k].contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: q [N, K] e4m3 times each block's scale in fp32, then in `dtype` ([N, K]); DEQUANTIZE_ROWS
    rows at a time, so that a matrix is never whole in fp32 beside its result."""
    n, k = q.shape
    bn, bk = block
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    step = max(bn, DEQUANTIZE_ROWS // bn * bn)
    for start in range(0, n, step):
        stop = min(n, start + step)
        s = scale[start // bn : -(-stop // bn)].float()  # [row blocks, sk]
        s = s.repeat_interleave(bn, dim=0)[: stop - start].repeat_interleave(bk, dim=1)[:, :k]  # [rows, K]
        out[start:stop] = (q[start:stop].float() * s).to(dtype)
    return out

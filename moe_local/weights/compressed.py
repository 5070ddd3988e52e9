"""compressed-tensors' `pack-quantized` int4, as Kimi-K2-Thinking ships its routed experts: per matrix [N, K]
`weight_packed` int32 [N, ceil(K / 8)] (eight 4-bit values a word, column 8j + i in bits 4i..4i+3, each stored
as q + 8 for q in -8..7), `weight_scale` [N, K / group] and `weight_shape` [2]; symmetric: w = q * scale.
Here: the config record, packing (for tests and tools), unpacking and the reference dequantization."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_local.errors import CheckpointError, ConfigError

PARTS = ("weight_packed", "weight_scale", "weight_shape")  # what replaces a matrix's `weight`
PER_WORD = 8


@dataclass(frozen=True)
class PackedInt4:
    """config.json's `quantization_config` for `quant_method: compressed-tensors` with 4-bit symmetric
    group-wise weights in `pack-quantized` format (one config group; what it does not target, `ignore`,
    is stored as plain tensors, which the checkpoint's tensor names tell)."""

    group: int

    @classmethod
    def from_config(cls, quant: dict) -> PackedInt4:
        if quant.get("format") != "pack-quantized":
            raise ConfigError(f"unsupported compressed-tensors format {quant.get('format')!r} (pack-quantized int4)")
        groups = list((quant.get("config_groups") or {}).values())
        if len(groups) != 1 or not isinstance(groups[0], dict):
            raise ConfigError(f"compressed-tensors with {len(groups)} config groups; one (int4 weights) is supported")
        weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
        wanted = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
        if any(weights.get(key) != value for key, value in wanted.items()) or acts or weights.get("actorder") or weights.get("dynamic"):
            raise ConfigError(f"unsupported compressed-tensors weights {weights!r}: int4, symmetric, group-wise, static, "
                              "no activation quantization, no act-order")  # fmt: skip
        group = weights.get("group_size")
        if not isinstance(group, int) or group < 1:
            raise ConfigError(f"compressed-tensors group_size must be a positive integer, not {group!r}")
        return cls(group)

    def shapes(self, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """The parts' shapes for a matrix of `shape` [N, K]."""
        n, k = shape
        return {"weight_packed": (n, -(-k // PER_WORD)), "weight_scale": (n, -(-k // self.group)), "weight_shape": (2,)}

    def check(self, prefix: str, shape: tuple[int, int], found: dict[str, tuple[tuple[int, ...], torch.dtype] | None]) -> None:
        """CheckpointError where matrix `prefix` (its name without `weight`) lacks a part, or has one of the
        wrong shape or dtype; `found`: part -> (shape, dtype) or None."""
        if shape[1] % self.group:
            raise CheckpointError(f"{prefix}weight_packed: {shape[1]} columns are not a multiple of the group size {self.group}")
        for part, want in self.shapes(shape).items():
            if found.get(part) is None:
                raise CheckpointError(f"the checkpoint has {prefix}weight_packed but lacks {prefix}{part} beside it")
            got, dtype = found[part]
            if tuple(got) != want:
                raise CheckpointError(f"{prefix}{part} has shape {list(got)}, but a matrix of {list(shape)} in int4 groups of "
                                      f"{self.group} needs {list(want)}")  # fmt: skip
            if part != "weight_scale" and dtype not in (torch.int32, torch.int64):
                raise CheckpointError(f"{prefix}{part} has dtype {dtype}; compressed-tensors stores it as int32")
            if part == "weight_scale" and not dtype.is_floating_point:
                raise CheckpointError(f"{prefix}weight_scale has dtype {dtype}; the scales are floats")


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers in -8..7 -> weight_packed int32 [N, ceil(K / 8)]."""
    n, k = q.shape
    u = torch.zeros(n, -(-k // PER_WORD) * PER_WORD, dtype=torch.int64)
    u[:, :k] = q.to(torch.int64) + 8
    words = sum(u[:, i::PER_WORD] << (4 * i) for i in range(PER_WORD))  # [N, K / 8], below 2^32
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """weight_packed int32 [N, ceil(K / 8)] -> the stored nibbles (q + 8, 0..15) as uint8 [N, K]."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 15 for i in range(PER_WORD)], dim=-1)  # [N, K / 8, 8]
    return nibbles.view(packed.shape[0], -1)[:, :k].to(torch.uint8)


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] int8 in -8..7, scale [N, K / group] bf16), symmetric: the group's largest
    magnitude at 7.5 (compressed-tensors' minmax observer's range), against the rounded scale."""
    n, k = w.shape
    groups = w.float().view(n, k // group, group)
    scale = (groups.abs().amax(dim=-1) / 7.5).clamp(min=1e-12).to(torch.bfloat16)
    q = (groups / scale.float()[..., None]).round().clamp(-8, 7).to(torch.int8)
    return q.view(n, k), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: (nibble - 8) * scale in fp32, then in `dtype`, [N, K]."""
    n, k = shape
    q = unpack(packed, k).float() - 8
    return (q.view(n, k // group, group) * scale.float()[..., None]).view(n, k).to(dtype)

"""`scheme`: a config.json's `quantization_config` read into the numeric format it names."""

from __future__ import annotations

from moe_local.errors import ConfigError
from moe_local.weights.compressed import PackedInt4
from moe_local.weights.fp8 import Fp8Blocks

Scheme = Fp8Blocks | PackedInt4


def scheme(quantization_config: dict | None) -> Scheme | None:
    """The scheme `quantization_config` names, None for none (or gpt-oss's MXFP4, which its family reads);
    ConfigError for any other."""
    if not quantization_config:
        return None
    if not isinstance(quantization_config, dict):
        raise ConfigError("config.json's quantization_config is not an object")
    method = quantization_config.get("quant_method")
    if method == "fp8":
        return Fp8Blocks.from_config(quantization_config)
    if method == "compressed-tensors":
        return PackedInt4.from_config(quantization_config)
    if method in (None, "mxfp4"):
        return None
    raise ConfigError(f"unsupported quantization_config.quant_method {method!r} (fp8 blocks, compressed-tensors int4, mxfp4 for gpt-oss)")

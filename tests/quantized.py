"""Tiny checkpoints in the quantized layouts the big MoEs are published in, written from a saved fp32 one:
FP8 blocks (`weight_scale_inv`, DeepSeek-V3's and Qwen3-FP8's layout) and compressed-tensors int4 (Kimi-K2's),
each beside a reference folder holding the same weights dequantized, for transformers to run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_local.weights import compressed, fp8

ROUTERS = (".gate.weight", ".router.weight", "shared_expert_gate.weight")


def linear_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """The matrices a published FP8 checkpoint stores in FP8: every linear layer of the decoder layers (attention,
    dense and shared MLPs, routed experts), not the embeddings, lm_head, norms or routers."""
    return [name for name, t in state.items() if name.startswith("model.layers.") and name.endswith(".weight")
            and t.dim() == 2 and not name.endswith(ROUTERS) and "norm" not in name]  # fmt: skip


def rewrite(folder: Path, reference: Path, convert, quantization_config: dict) -> None:
    """Copy `folder` (a saved fp32 model) to `reference`; rewrite `folder`'s weights through `convert(name, w)`
    (-> the tensors to store instead, and the values they stand for) and its config.json with
    `quantization_config`; put the values in `reference`'s weights."""
    shutil.copytree(folder, reference)
    (shard,) = folder.glob("*.safetensors")
    state = load_file(shard)
    stored, values = {}, {}
    for name, w in state.items():
        parts, value = convert(name, w)
        stored |= parts
        values[name] = value
    save_file(stored, shard, metadata={"format": "pt"})
    save_file(values, reference / shard.name, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def to_fp8(folder: Path, reference: Path, block: tuple[int, int], ue8m0: bool = False, e8m0_bytes: bool = False,
           keep: tuple[str, ...] = ()) -> None:  # fmt: skip
    """The FP8 layout: each linear layer's weight in e4m3 with `weight_scale_inv` per block of `block`, fp32 (power
    of two with `ue8m0`, stored as F8_E8M0 bytes with `e8m0_bytes`, as transformers' FineGrainedFP8 keeps them);
    the matrices named in `keep` stay as they are and are listed in modules_to_not_convert."""
    state = load_file(next(folder.glob("*.safetensors")))
    converted = set(linear_weights(state)) - {k + ".weight" for k in keep}

    def convert(name, w):
        if name not in converted:
            return {name: w}, w
        q, scale = fp8.quantize(w, block, ue8m0)
        stored = scale.to(torch.float8_e8m0fnu) if e8m0_bytes else scale
        return {name: q, name + "_scale_inv": stored}, fp8.dequantize(q, scale, block)

    config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
              "modules_to_not_convert": ["lm_head", "model.embed_tokens", *keep]}  # fmt: skip
    if ue8m0:
        config["scale_fmt"] = "ue8m0"
    rewrite(folder, reference, convert, config)


def to_compressed_int4(folder: Path, reference: Path, group: int = 32) -> None:
    """Kimi-K2-Thinking's layout: the routed experts in compressed-tensors int4 (symmetric, groups of `group`,
    bf16 scales), everything else as it was (its config's `ignore`)."""

    def convert(name, w):
        if ".experts." not in name or not name.endswith(".weight"):
            return {name: w}, w
        q, scale = compressed.quantize(w, group)
        prefix = name.removesuffix("weight")
        parts = {prefix + "weight_packed": compressed.pack(q), prefix + "weight_scale": scale,
                 prefix + "weight_shape": torch.tensor(list(w.shape), dtype=torch.int32)}  # fmt: skip
        return parts, (q.float().view(w.shape[0], -1, group) * scale.float()[..., None]).view(w.shape)

    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                                        "group_size": group, "dynamic": False, "actorder": None,
                                                        "observer": "minmax", "block_structure": None}}},
              "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
              "kv_cache_scheme": None}  # fmt: skip
    rewrite(folder, reference, convert, config)

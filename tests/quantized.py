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


def to_fp8(folder: Path, reference: Path, block: tuple[int, int], scales: str = "fp32", keep: tuple[str, ...] = ()) -> None:
    """The FP8 layout: each linear layer's weight in e4m3 with `weight_scale_inv` per block of `block`, the scales
    `scales`: "fp32"; "ue8m0", powers of two (`scale_fmt: ue8m0`) stored as fp32, or "e8m0" as F8_E8M0 bytes (as
    transformers' FineGrainedFP8 keeps them); "bf16", as Qwen's -FP8 repos store them. The matrices named in
    `keep` stay as they are and are listed in modules_to_not_convert."""
    state = load_file(next(folder.glob("*.safetensors")))
    converted = set(linear_weights(state)) - {k + ".weight" for k in keep}
    ue8m0 = scales in ("ue8m0", "e8m0")
    stored_dtype = {"fp32": torch.float32, "ue8m0": torch.float32, "e8m0": torch.float8_e8m0fnu, "bf16": torch.bfloat16}[scales]

    def convert(name, w):
        if name not in converted:
            return {name: w}, w
        q, scale = fp8.quantize(w, block, ue8m0)
        stored = scale.to(stored_dtype)
        return {name: q, name + "_scale_inv": stored}, fp8.dequantize(q, stored.float(), block)

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


def add_fp8_extras(folder: Path, extras: dict[str, tuple[int, int]], block: tuple[int, int]) -> None:
    """Add tensors the model does not read to `folder`'s FP8 checkpoint, in FP8 with their scales as the published
    files hold them (the multi-token-prediction head, a vision tower's projections): name -> shape."""
    (shard,) = folder.glob("*.safetensors")
    state = load_file(shard)
    gen = torch.Generator().manual_seed(0)
    for name, shape in extras.items():
        state[name], state[name + "_scale_inv"] = fp8.quantize(torch.randn(shape, generator=gen), block)
    save_file(state, shard, metadata={"format": "pt"})


def to_qwen35_multimodal(folder: Path) -> None:
    """Rewrite a saved Qwen3.5-MoE text checkpoint (quantized or not) in place into the layout Qwen publishes it
    in (`Qwen3_5MoeForConditionalGeneration`): the text model's tensors under model.language_model., its config
    under `text_config`, the quantization_config at the top level with the text model's names under the same
    prefix, and a vision tower's tensors beside them (one kept, one FP8 where the checkpoint is)."""
    (shard,) = folder.glob("*.safetensors")
    state = {name.replace("model.", "model.language_model.", 1): t for name, t in load_file(shard).items()}
    state["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(48, 16)
    save_file(state, shard, metadata={"format": "pt"})
    text = json.loads((folder / "config.json").read_text())
    config = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
              "tie_word_embeddings": text.pop("tie_word_embeddings", False), "text_config": text,
              "vision_config": {"model_type": "qwen3_5_moe", "depth": 1, "hidden_size": 16}}  # fmt: skip
    if quant := text.pop("quantization_config", None):
        quant["modules_to_not_convert"] = [m.replace("model.", "model.language_model.", 1) for m in quant["modules_to_not_convert"]]
        config["quantization_config"] = {**quant, "modules_to_not_convert": [*quant["modules_to_not_convert"], "model.visual.blocks.0.attn.qkv"]}
        add_fp8_extras(folder, {"model.visual.blocks.0.mlp.linear_fc1.weight": (64, 16)}, tuple(quant["weight_block_size"]))
    (folder / "config.json").write_text(json.dumps(config, indent=2))

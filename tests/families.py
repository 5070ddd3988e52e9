"""Tiny random checkpoints of every supported MoE family, built with transformers' own config and model
classes and saved with `save_pretrained`, each variant switching on the options that family differs by."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Shared by every variant: small, several layers, 8 experts with top-2 routing, weights large enough that
# logits and routing are far from uniform.
BASE = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            moe_intermediate_size=32, intermediate_size=96, n_routed_experts=8)

_HYBRID = dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=48, head_dim=16,
               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12)

# name -> (model_type, the options that variant switches on)
VARIANTS = {
    # q/k RMSNorm per head, explicit head_dim, renormalised top-k, one dense MLP layer among the MoE layers
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96, head_dim=24,
                                    norm_topk_prob=True, mlp_only_layers=[1])),
    # attention biases everywhere, YaRN RoPE, no renormalisation
    "qwen3_moe-yarn": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96, attention_bias=True,
                                         norm_topk_prob=False, rope_parameters=dict(
                                             rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32))),
    # q/k/v biases, a shared expert under a sigmoid gate, sparse every second layer
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, moe_intermediate_size=32, intermediate_size=96,
                                    shared_expert_intermediate_size=48, decoder_sparse_step=2)),
    # q/k norms over the whole projection, clipping
    "olmoe": ("olmoe", dict(num_experts=8, intermediate_size=32, clip_qkv=0.4, eos_token_id=2, pad_token_id=1)),
    # sigmoid router with selection bias, group-limited top-k, scaling, shared expert, a dense first layer,
    # partial rotary, attention bias, q/k norm
    "glm4_moe": ("glm4_moe", dict(n_routed_experts=8, moe_intermediate_size=32, intermediate_size=96, head_dim=16,
                                  first_k_dense_replace=1, n_group=4, topk_group=2, n_shared_experts=1,
                                  routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True,
                                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
    # MLA without a query latent, softmax group-limited greedy routing, YaRN with mscale, two shared experts
    "deepseek_v2": ("deepseek_v2", dict(**_MLA, q_lora_rank=None, first_k_dense_replace=1, n_shared_experts=2,
                                        topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                        routed_scaling_factor=1.5, rope_parameters=dict(
                                            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
                                            beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707))),
    # MLA with a query latent, noaux_tc routing, interleaved rotary pairs
    "deepseek_v3": ("deepseek_v3", dict(**_MLA, q_lora_rank=24, first_k_dense_replace=1, n_shared_experts=1,
                                        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
    # DeepSeek Sparse Attention: deepseek_v3's MLA with an indexer of 16 heads of 16 keeping 6 past tokens of
    # each query (every prompt in the tests is longer, so tokens really are dropped). 16 heads: a key scores
    # exactly 0 only when all 16 ReLUs are 0, so no two keys tie at the 6th place, where torch's topk breaks
    # ties by the length of the row it is given (transformers' prefill gives the whole prompt's, a chunk ours)
    "deepseek_v32": ("deepseek_v32", dict(**_MLA, q_lora_rank=24, first_k_dense_replace=1, n_shared_experts=1,
                                          n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                          index_n_heads=16, index_head_dim=16, index_topk=6)),
    # GLM-5's DSA: the indexer's rotary in interleaved pairs, over the first 8 of its 16 dims; the MoE layers
    # named by mlp_layer_types; GLM-5.2's shared indexer layers: the second keeps what the first kept
    "glm_moe_dsa": ("glm_moe_dsa", dict(**_MLA, q_lora_rank=24, n_shared_experts=1, routed_scaling_factor=2.5,
                                        norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"],
                                        index_n_heads=16, index_head_dim=16, index_topk=6,
                                        indexer_types=["full", "shared", "full"])),
    # attention sinks, sliding windows (6 positions: every sequence in the tests is longer) alternating with
    # full attention, biases everywhere, YaRN (gpt-oss's defaults), router bias, clamped SwiGLU with biases,
    # gate and up interleaved in one fused tensor per layer
    "gpt_oss": ("gpt_oss", dict(num_local_experts=8, intermediate_size=32, head_dim=16, sliding_window=6,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # sigmoid router with selection bias (outside the gate module), q/k norms over the whole projections,
    # a quarter of each head rotated (the published files' `rotary_dim`)
    "minimax_m2": ("minimax_m2", dict(num_local_experts=8, intermediate_size=32, head_dim=16, rotary_dim=4)),
    # Gated DeltaNet hybrids: linear-attention layers around a gated full-attention one (partial rotary,
    # zero-centred norms, per-head q/k norm), 2 value heads per key head, a shared expert under a sigmoid
    # gate; Qwen3.5's split input projections (transformers' text-only class)...
    "qwen3_5_moe": ("qwen3_5_moe_text", dict(**_HYBRID, layer_types=["linear_attention", "full_attention", "linear_attention"])),
    # ... and Qwen3-Next's fused ones, full attention first, a dense MLP layer
    "qwen3_next": ("qwen3_next", dict(**_HYBRID, intermediate_size=96, mlp_only_layers=[2],
                                      layer_types=["full_attention", "linear_attention", "linear_attention"])),
    # Gemma 4 26B-A4B's layout: a dense GeGLU MLP beside the routed experts in every layer, each between norms
    # of its own, the router's input scale and per-expert scales; sliding layers (6 positions) and full ones
    # with twice the head size, one KV head whose values are its keys' projection, proportional rotary over a
    # quarter; q/k/v norms, sandwich norms and layer scalars, embeddings times sqrt(D), tied, soft-capped logits
    "gemma4": ("gemma4_text", dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                                   intermediate_size=48, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                                   attention_k_eq_v=True, hidden_size_per_layer_input=0, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                                   num_hidden_layers=4, final_logit_softcapping=30.0, tie_word_embeddings=True)),
}


def to_mxfp4(folder: Path) -> None:
    """Rewrite a saved gpt-oss checkpoint's experts in the published MXFP4 layout (`*_blocks`, `*_scales`,
    quantization_config.quant_method "mxfp4"), as OpenAI ships gpt-oss-20b and -120b."""
    from safetensors.torch import load_file, save_file

    from moe_local.weights import mxfp4

    state = load_file(folder / "model.safetensors")
    out = {}
    for name, tensor in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> per expert [out, in]
            blocks, scales = zip(*(mxfp4.quantize(tensor[e].T) for e in range(tensor.shape[0])))
            out[name + "_blocks"], out[name + "_scales"] = torch.stack(blocks), torch.stack(scales)
        else:
            out[name] = tensor
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def to_gemma4_multimodal(text: Path, folder: Path) -> None:
    """Write a saved Gemma 4 text checkpoint (`gemma4_text`) into `folder` in the layout Google publishes
    Gemma 4 in (Gemma4ForConditionalGeneration): the config nested as `text_config` under model_type "gemma4",
    the text model's tensors under model.language_model., and a vision tower's beside them."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {name.replace("model.", "model.language_model.", 1): t for name, t in load_file(text / "model.safetensors").items()}
    state["model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight"] = torch.randn(8, 8)
    state["model.embed_vision.embedding_projection.weight"] = torch.randn(64, 8)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((text / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": config,
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 8}, "tie_word_embeddings": True,
        "eos_token_id": [config["eos_token_id"], 106 % config["vocab_size"]], "dtype": "float32",
    }, indent=2))


def build_family(variant: str, folder: Path, tokenizer_dir: Path | None = None, seed: int = 0, **overrides):
    """Save a random model of `variant` into `folder` (and copy in a tokenizer); return the reference model
    loaded back from the folder, in fp32."""
    model_type, options = VARIANTS[variant]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**BASE, **options, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # transformers initialises the selection bias to 0: give it something to select by
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape) * 0.1)
        for name, p in model.named_parameters():  # and sinks large enough to matter
            if name.endswith("sinks"):
                p.copy_(torch.randn(p.shape))
            if name.endswith("norm.weight") and not p.any():  # zero-centred norms (scaled by 1 + w) start at 0
                p.copy_(torch.randn(p.shape) * 0.2)
        if model_type == "gemma4_text":  # norms, scales and scalars initialised to 1: each its own, so a misplaced one shows
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", "layer_scalar", "router.scale", "per_expert_scale")):
                    p.copy_(1 + 0.3 * torch.randn(p.shape))
            for name, b in model.named_buffers():
                if name.endswith("layer_scalar"):
                    b.copy_(1 + 0.3 * torch.randn(b.shape))
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def build_variant(name: str, folder: Path, tokenizer_dir: Path | None = None) -> None:
    """`build_family` for a name of `VARIANTS`, or Mixtral: "mixtral" (conftest's tiny one) or "mixtral-window"
    (the same with a sliding window of 6, kept as a ring)."""
    if name.startswith("mixtral"):
        from conftest import build_mixtral

        build_mixtral(folder, tokenizer_dir, **({"sliding_window": 6} if name == "mixtral-window" else {}))
    else:
        build_family(name, folder, tokenizer_dir)

"""A GGUF model's files and what their headers say, without torch (the server's HTTP process reads the
tokenizer from them): finding the file or split files (`-00001-of-0000N.gguf`) of a path or folder, each file's
metadata (read by the `gguf` package, the format's own library) and tensors (name, ggml type, shape, byte
range), with one clear line for what is not a whole GGUF file; and the metadata as the config.json fields
`ModelConfig.from_hf` reads, per llama.cpp architecture (`hf_config`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf

from moe_local.errors import CheckpointError, ConfigError

SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

def find_gguf(path: str | os.PathLike) -> list[Path] | None:
    """The GGUF file(s) of a model given as a `.gguf` path (any part of a split model) or as a folder holding
    one model's GGUF file(s); None if `path` is neither (a safetensors folder, say)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            return None
        return _split_parts(path)
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.gguf"))
    if not files or (path / "config.json").is_file():  # a safetensors folder with a GGUF beside it is read as safetensors
        return None
    models = {m.group("stem") if (m := SPLIT.match(f.name)) else f.stem: f for f in files}
    if len(models) > 1:
        raise CheckpointError(f"{path} holds several GGUF models ({', '.join(f.name for f in models.values())}); give the file")
    return _split_parts(next(iter(models.values())))


def _split_parts(path: Path) -> list[Path]:
    m = SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m.group("count"))
    parts = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise CheckpointError(f"split GGUF {path.name} lacks its part(s) {', '.join(missing)} in {path.parent}")
    return parts


@dataclass(frozen=True)
class GgufTensor:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch's order: outermost first ([E, F, D] for stacked experts); ggml lists it reversed
    file: Path
    start: int  # byte offset of the data in `file`
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.qtype, self.shape[-1])


def row_bytes(qtype: gguf.GGMLQuantizationType, n: int) -> int:
    """Bytes of a row of `n` values of a ggml type (n a multiple of the type's block)."""
    values, size = gguf.GGML_QUANT_SIZES[qtype]
    if n % values:
        raise CheckpointError(f"a row of {n} values is not a whole number of {qtype.name} blocks of {values}")
    return n // values * size


def read_file(path: Path) -> tuple[dict, dict[str, GgufTensor]]:
    """One GGUF file's metadata (key -> value) and tensors, with a clear error for what is not a whole GGUF file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path.name} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # the enum's own message: "N is not a valid GGMLQuantizationType"
            raise CheckpointError(f"{path.name} holds a tensor of an unknown ggml type ({e}); this gguf library (gguf {_version()}) cannot read it") from None
        raise CheckpointError(f"{path.name} is truncated or corrupt: {e}") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as e:
        raise CheckpointError(f"{path.name} is truncated or corrupt ({type(e).__name__}: {e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            metadata[key] = field.contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        info = GgufTensor(t.name, t.tensor_type, shape, path, int(t.data_offset), int(t.n_bytes))
        if info.start + info.nbytes > size:
            raise CheckpointError(f"{path.name} is truncated: tensor {t.name} ends at byte {info.start + info.nbytes:,}, the file has {size:,}")
        tensors[t.name] = info
    del reader  # drops its memory map of the file
    return metadata, tensors


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return "?"


# ---- metadata -> config.json's fields ---------------------------------------------------------------------


class Metadata:
    """One architecture's `{arch}.*` keys, read by their short names; a missing key without a default is one line."""

    def __init__(self, metadata: dict, tensors: dict[str, GgufTensor]):
        self.all, self.tensors = metadata, tensors
        self.arch = metadata.get("general.architecture")

    def __call__(self, key: str, default=...):
        value = self.all.get(f"{self.arch}.{key}", None if default is ... else default)
        if value is None and default is ...:
            raise ConfigError(f"the GGUF's metadata lacks {self.arch}.{key}")
        return value

    def has(self, tensor: str) -> bool:
        return tensor in self.tensors

    @property
    def head_dim(self) -> int:
        return int(self("attention.key_length", int(self("embedding_length")) // int(self("attention.head_count"))))

    def values(self, tensor: str) -> list[float]:
        """A small F32 tensor's values, read from the file (no torch: numpy)."""
        import numpy as np

        info = self.tensors[tensor]
        if info.qtype != gguf.GGMLQuantizationType.F32:
            raise ConfigError(f"the GGUF's {tensor} is {info.qtype.name}, not F32")
        return np.fromfile(info.file, dtype=np.float32, count=info.nbytes // 4, offset=info.start).tolist()

    def rotary_factor(self) -> dict:
        """`partial_rotary_factor` where the rotated part of a head (`rope.dimension_count`) is not all of it."""
        rotated = self("rope.dimension_count", None)
        return {} if rotated is None or int(rotated) == self.head_dim else {"partial_rotary_factor": int(rotated) / self.head_dim}


def _mixtral(m: Metadata) -> dict:
    return {"num_local_experts": m("expert_count"), "intermediate_size": m("expert_feed_forward_length", None) or m("feed_forward_length")}


def _qwen3_moe(m: Metadata) -> dict:
    # llama.cpp's qwen3moe renormalises the chosen weights, its qwen2moe does not (whatever the source said)
    return {"num_experts": m("expert_count"), "moe_intermediate_size": m("expert_feed_forward_length"), "norm_topk_prob": True,
            "mlp_only_layers": [], "decoder_sparse_step": 1, "attention_bias": m.has("blk.0.attn_q.bias")}  # fmt: skip


def _qwen2_moe(m: Metadata) -> dict:
    return {"num_experts": m("expert_count"), "moe_intermediate_size": m("expert_feed_forward_length"), "norm_topk_prob": False,
            "mlp_only_layers": [], "decoder_sparse_step": 1, "qkv_bias": m.has("blk.0.attn_q.bias"),
            "shared_expert_intermediate_size": m("expert_shared_feed_forward_length")}  # fmt: skip


def _olmoe(m: Metadata) -> dict:
    return {"num_experts": m("expert_count"), "intermediate_size": m("expert_feed_forward_length", None) or m("feed_forward_length"),
            "norm_topk_prob": False, "clip_qkv": m("attention.clamp_kqv", None)}  # fmt: skip


def _hybrid(m: Metadata) -> dict:
    """Qwen3-Next and Qwen3.5-MoE: the DeltaNet's geometry in llama.cpp's `ssm.*` keys (a Mamba's names)."""
    v_heads = int(m("ssm.time_step_rank"))
    recurrent = m("attention.recurrent_layers", None)
    fields = {"num_experts": m("expert_count"), "moe_intermediate_size": m("expert_feed_forward_length"),
              "shared_expert_intermediate_size": m("expert_shared_feed_forward_length"), "norm_topk_prob": True,
              "linear_num_key_heads": m("ssm.group_count"), "linear_num_value_heads": v_heads,
              "linear_key_head_dim": m("ssm.state_size"), "linear_value_head_dim": int(m("ssm.inner_size")) // v_heads,
              "linear_conv_kernel_dim": m("ssm.conv_kernel"), "full_attention_interval": m("full_attention_interval", 4),
              "attention_bias": m.has("blk.0.attn_output.bias") or m.has("blk.0.attn_q.bias"),
              "mlp_only_layers": [], "decoder_sparse_step": 1, "partial_rotary_factor": 1.0, **m.rotary_factor()}  # fmt: skip
    if recurrent is not None:
        fields["layer_types"] = ["linear_attention" if r else "full_attention" for r in recurrent]
    return fields


def _gpt_oss(m: Metadata) -> dict:
    fields = {"num_local_experts": m("expert_count"), "intermediate_size": m("expert_feed_forward_length"),
              "sliding_window": m("attention.sliding_window"),  # llama.cpp's gpt-oss: every even layer sliding
              "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(int(m("block_count")))]}  # fmt: skip
    experts = [t for name, t in m.tensors.items() if name.endswith("_exps.weight")]
    if experts and all(t.qtype == gguf.GGMLQuantizationType.MXFP4 for t in experts):  # as OpenAI published them
        fields["quantization_config"] = {"quant_method": "mxfp4"}
    return fields


def _glm4_moe(m: Metadata) -> dict:
    if int(m("expert_gating_func", 2)) != 2:
        raise ConfigError(f"unsupported {m.arch}.expert_gating_func {m('expert_gating_func')} (2: sigmoid)")
    return {"n_routed_experts": m("expert_count"), "moe_intermediate_size": m("expert_feed_forward_length"),
            "intermediate_size": m("feed_forward_length"), "first_k_dense_replace": m("leading_dense_block_count", 0),
            "n_shared_experts": m("expert_shared_count", 0), "routed_scaling_factor": m("expert_weights_scale", 1.0),
            "norm_topk_prob": bool(m("expert_weights_norm", True)), "n_group": m("expert_group_count", 1),
            "topk_group": m("expert_group_used_count", 1), "use_qk_norm": m.has("blk.0.attn_q_norm.weight"),
            "attention_bias": m.has("blk.0.attn_q.bias"), "partial_rotary_factor": 1.0, **m.rotary_factor()}  # fmt: skip


def _minimax_m2(m: Metadata) -> dict:
    return {"num_local_experts": m("expert_count"), "intermediate_size": m("expert_feed_forward_length"),
            "rotary_dim": m("rope.dimension_count", m.head_dim)}  # fmt: skip


def _deepseek2(m: Metadata) -> dict:
    """DeepSeek-V2 (softmax router) and V3/R1/Kimi K2 (sigmoid with a selection bias): one llama.cpp architecture,
    told apart by `expert_gating_func`."""
    gating = int(m("expert_gating_func", 1))
    if gating not in (1, 2):
        raise ConfigError(f"unsupported {m.arch}.expert_gating_func {gating} (1: softmax, 2: sigmoid)")
    rope = int(m("rope.dimension_count"))
    fields = {"model_type": "deepseek_v3" if gating == 2 else "deepseek_v2", "num_key_value_heads": m("attention.head_count"),
              "n_routed_experts": m("expert_count"), "moe_intermediate_size": m("expert_feed_forward_length"),
              "intermediate_size": m("feed_forward_length"), "first_k_dense_replace": m("leading_dense_block_count", 0),
              "n_shared_experts": m("expert_shared_count", 0), "routed_scaling_factor": m("expert_weights_scale", 1.0),
              "norm_topk_prob": bool(m("expert_weights_norm", False)), "n_group": m("expert_group_count", 1),
              "topk_group": m("expert_group_used_count", 1), "kv_lora_rank": m("attention.kv_lora_rank"),
              "q_lora_rank": m("attention.q_lora_rank", None), "qk_rope_head_dim": rope,
              "qk_nope_head_dim": int(m("attention.key_length_mla")) - rope, "v_head_dim": m("attention.value_length_mla")}  # fmt: skip
    if gating == 1:
        if fields["norm_topk_prob"]:
            raise ConfigError(f"unsupported {m.arch} with a softmax router that renormalises (expert_weights_norm)")
        fields["topk_method"] = "group_limited_greedy" if int(fields["n_group"]) > 1 else "greedy"
    return fields


def _gemma4(m: Metadata) -> dict:
    """Gemma 4 (26B-A4B): sliding and full layers with their own head size (`key_length_swa`, `key_length`) and KV
    heads (a count per layer), values from the keys' projection where a full layer has no attn_v; the full layers'
    proportional rotary as llama.cpp's `rope_freqs` (factor 1 for a turning pair, 1e30 for a still one)."""
    sliding = [bool(s) for s in m("attention.sliding_window_pattern")]
    kv = m("attention.head_count_kv")
    kv = kv if isinstance(kv, list) else [kv] * len(sliding)
    full = [i for i, s in enumerate(sliding) if not s]
    if not full:
        raise ConfigError(f"the GGUF's {m.arch}.attention.sliding_window_pattern has no full-attention layer")
    full_dim, swa_dim = int(m("attention.key_length")), int(m("attention.key_length_swa"))
    turning = sum(1 for f in m.values("rope_freqs.weight") if f == 1.0) if m.has("rope_freqs.weight") else full_dim // 2
    swa_rotated = int(m("rope.dimension_count_swa", swa_dim))
    return {"enable_moe_block": True, "num_experts": m("expert_count"), "top_k_experts": m("expert_used_count"),
            "moe_intermediate_size": m("expert_feed_forward_length"), "intermediate_size": m("feed_forward_length"),
            "head_dim": swa_dim, "global_head_dim": full_dim, "num_key_value_heads": kv[sliding.index(True)] if True in sliding else kv[0],
            "num_global_key_value_heads": kv[full[0]], "attention_k_eq_v": not m.has(f"blk.{full[0]}.attn_v.weight"),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "sliding_window": m("attention.sliding_window"), "final_logit_softcapping": m("final_logit_softcapping", None),
            "hidden_size_per_layer_input": m("embedding_length_per_layer_input", 0), "num_kv_shared_layers": m("attention.shared_kv_layers", 0),
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": float(m("rope.freq_base_swa")),
                                                      **({"partial_rotary_factor": swa_rotated / swa_dim} if swa_rotated != swa_dim else {})},
                                "full_attention": {"rope_type": "proportional", "rope_theta": float(m("rope.freq_base")),
                                                   "partial_rotary_factor": 2 * turning / full_dim}}}  # fmt: skip


@dataclass(frozen=True)
class Architecture:
    """What one llama.cpp architecture is to us: the model_type (`FAMILIES`' key) it runs as, its config.json
    fields from the metadata (beyond the common ones `hf_config` reads), and the layouts its converter changed,
    undone when the tensors are read (`gguf_model.resident_names`)."""

    model_type: str
    fields: Callable[[Metadata], dict]
    ffn_norm: str = "ffn_norm"  # the norm before the feed-forward (llama.cpp names it after attention in some)
    permuted_qk: bool = False  # `llama`: q/k rows permuted per head so that rotary pairs are adjacent
    norm_plus_one: bool = False  # zero-centred RMSNorms stored as 1 + w (but the DeltaNet's gated one)
    tiled_v_heads: bool = False  # Qwen3.5: the DeltaNet's value heads reordered from grouped by key head to tiled
    nextn_layers: bool = False  # block_count counts the multi-token-prediction layers (`nextn_predict_layers`)
    fused_gate_up: bool = False  # the routed experts' gate and up rows in one tensor (`ffn_gate_up_exps`, gate first)


# llama.cpp's architecture name -> what it is to us
ARCHITECTURES = {
    "llama": Architecture("mixtral", _mixtral, permuted_qk=True),
    "qwen3moe": Architecture("qwen3_moe", _qwen3_moe),
    "qwen2moe": Architecture("qwen2_moe", _qwen2_moe),
    "olmoe": Architecture("olmoe", _olmoe),
    "qwen35moe": Architecture("qwen3_5_moe_text", _hybrid, "post_attention_norm", norm_plus_one=True, tiled_v_heads=True),
    "qwen3next": Architecture("qwen3_next", _hybrid, "post_attention_norm", norm_plus_one=True),
    "gpt-oss": Architecture("gpt_oss", _gpt_oss, "post_attention_norm"),
    "glm4moe": Architecture("glm4_moe", _glm4_moe, "post_attention_norm", nextn_layers=True),
    "minimax-m2": Architecture("minimax_m2", _minimax_m2),
    "deepseek2": Architecture("deepseek_v2", _deepseek2, nextn_layers=True),  # model_type deepseek_v3 with a sigmoid router
    "gemma4": Architecture("gemma4_text", _gemma4, fused_gate_up=True),
}


def architecture(metadata: dict) -> Architecture:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch]


def hf_config(metadata: dict, tensors: dict[str, GgufTensor]) -> dict:
    """The config.json fields `ModelConfig.from_hf` reads, from the GGUF's metadata (`{arch}.*`, `tokenizer.ggml.*`)
    and what the tensors show (a tied output, biases, q/k norms)."""
    record, m = architecture(metadata), Metadata(metadata, tensors)
    heads = int(m("attention.head_count"))
    if int(m("expert_count", 0)) == 0:
        raise ConfigError(f"this GGUF ({m.arch}) is a dense model with no routed experts; moe-local runs MoE models")
    vocab = m("vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens") or ()) or tensors["token_embd.weight"].shape[0]
    kv_heads = m("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per layer (Gemma 4); the families here have one count
        kv_heads = max(kv_heads)
    n_layers = int(m("block_count")) - (int(m("nextn_predict_layers", 0)) if record.nextn_layers else 0)
    raw = {
        "model_type": record.model_type,
        "vocab_size": int(vocab),
        "hidden_size": int(m("embedding_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": m.head_dim,
        "num_experts_per_tok": int(m("expert_used_count")),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(m("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = m("rope.scaling.type", "none")
    if scaling == "yarn":
        raw["rope_scaling"] = {"rope_type": "yarn", "factor": float(m("rope.scaling.factor")),
                               "original_max_position_embeddings": int(m("rope.scaling.original_context_length")),
                               "beta_fast": float(m("rope.scaling.yarn_beta_fast", 32.0)), "beta_slow": float(m("rope.scaling.yarn_beta_slow", 1.0))}  # fmt: skip
        if (log_mul := m("rope.scaling.yarn_log_multiplier", None)) is not None:
            # llama.cpp keeps 0.1 * mscale_all_dim and takes mscale to equal it (as DeepSeek's published configs have it)
            raw["rope_scaling"] |= {"mscale": float(log_mul) / 0.1, "mscale_all_dim": float(log_mul) / 0.1}
    elif scaling != "none":
        raise ConfigError(f"unsupported RoPE scaling {scaling!r} in the GGUF's metadata (supported: none, yarn)")
    return raw | record.fields(m)

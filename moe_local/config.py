"""`ModelConfig`: the one place that reads a family's `config.json` field names."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_local.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mixtral",)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    dim: int  # hidden size
    ffn_dim: int  # one expert's intermediate size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype | None  # as declared in config.json, if it says

    @classmethod
    def from_hf(cls, raw: dict) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r} in config.json "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            dim = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            # transformers >= 5 nests rope_theta in rope_parameters; older files have it at the top.
            rope = raw.get("rope_parameters") or {}
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default" or raw.get("rope_scaling"):
                raise ConfigError(f"unsupported RoPE scaling {rope_type!r} in config.json")
            eos = raw.get("eos_token_id")
            cfg = cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                dim=dim,
                ffn_dim=int(raw["intermediate_size"]),
                n_layers=int(raw["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
                head_dim=int(raw.get("head_dim") or dim // n_heads),
                n_experts=int(raw["num_local_experts"]),
                top_k=int(raw["num_experts_per_tok"]),
                norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 1e6))),
                max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
                sliding_window=raw.get("sliding_window") or None,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
                dtype=DTYPES.get(raw.get("dtype") or raw.get("torch_dtype") or ""),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a malformed field: {e}") from None
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {raw['hidden_act']!r} (only silu)")
        if not 0 < cfg.top_k <= cfg.n_experts:
            raise ConfigError(f"num_experts_per_tok={cfg.top_k} must be between 1 and num_local_experts={cfg.n_experts}")
        if cfg.n_heads % cfg.n_kv_heads:
            raise ConfigError(f"num_attention_heads={cfg.n_heads} is not a multiple of num_key_value_heads={cfg.n_kv_heads}")
        return cfg

    @property
    def expert_numel(self) -> int:
        """Parameters of one expert: w1 [F, D], w2 [D, F], w3 [F, D]."""
        return 3 * self.ffn_dim * self.dim

    @property
    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        return {"w1": (self.ffn_dim, self.dim), "w2": (self.dim, self.ffn_dim), "w3": (self.ffn_dim, self.dim)}

    @property
    def attention_numel(self) -> int:
        """Parameters of one layer's attention projections: q, k, v [(H + 2 Hkv) hd, D] and o [D, H hd]."""
        return self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)

    @property
    def attention_rows(self) -> int:
        """Output channels of one layer's attention projections (one int8 scale each)."""
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim + self.dim

    def resident_numel(self) -> int:
        """Parameters that stay on the device: everything except the experts."""
        d = self.dim
        per_layer = self.attention_numel + self.n_experts * d + 2 * d  # attention, router, two norms
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.n_layers * per_layer + embed + head + d

    def kv_cache_numel(self, ctx_size: int) -> int:
        return 2 * self.n_layers * ctx_size * self.n_kv_heads * self.head_dim


# Geometries of published models (their config.json fields), for `plan` and `bench` without a checkpoint.
_MIXTRAL = dict(model_type="mixtral", num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False, dtype="bfloat16")
PRESETS = {
    "mixtral-8x7b": {**_MIXTRAL, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "max_position_embeddings": 32768},
    "mixtral-8x22b": {**_MIXTRAL, "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                      "num_hidden_layers": 56, "num_attention_heads": 48, "max_position_embeddings": 65536},
    # small enough for a CPU smoke test, with the same structure (GQA, 8 experts, top-2)
    "tiny": {**_MIXTRAL, "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096},
}


def preset_config(name: str, n_layers: int | None = None) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    raw = dict(PRESETS[name])
    if n_layers is not None:
        if n_layers < 1:
            raise ConfigError(f"--layers must be at least 1, not {n_layers}")
        raw["num_hidden_layers"] = n_layers
    return ModelConfig.from_hf(raw)

"""`ModelConfig`: the one place that reads `config.json` field names, and the family table that says how
each supported `model_type` maps onto it (`FAMILIES`). The model is assembled from the pieces a config
names (attention kind, q/k norm, biases, router, shared expert, dense layers); see `moe_local/model.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from moe_local.weights import schemes
from moe_local.errors import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class RouterConfig:
    """How a MoE layer's router turns logits [T, E] into weights and indices (see `moe_local/routing.py`).

    scoring: "softmax" (Mixtral, Qwen, OLMoE, DeepSeek-V2) or "sigmoid" (GLM-4.5, DeepSeek-V3).
    groups: experts split into `n_group` groups, only the best `topk_group` groups are eligible; a group's
    score is its best expert ("max", DeepSeek-V2's group_limited_greedy) or the sum of its best two
    ("top2", DeepSeek-V3's noaux_tc and GLM-4.5). correction_bias: a learned per-expert bias added to the
    scores to choose experts but not to weight them. The chosen weights are renormalised to sum to 1 or
    not, then multiplied by `scaling`. fp32: the router's matmul in fp32, as GLM and DeepSeek do."""

    scoring: str = "softmax"
    renormalize: bool = True
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # or "top2"
    correction_bias: bool = False
    fp32: bool = False
    # Gemma 4: the router's input is RMS-normalised and scaled by a learned vector and 1/sqrt(D) (`input_scale`),
    # and each chosen weight is multiplied by its expert's learned scale (`expert_scale`)
    input_scale: bool = False
    expert_scale: bool = False


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `dim` of each head's dimensions rotated (all, or a part: GLM), in halves (the HF
    layout; DeepSeek's interleaved pairs are reordered into halves when the weights are read), frequencies
    from `theta` and, for YaRN, the rest; cos and sin are multiplied by `attention_factor`."""

    theta: float
    dim: int
    kind: str = "default"  # or "yarn", or "proportional" (Gemma 4: frequencies over the whole head, `rotated` of its dimensions turning)
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    interleaved: bool = False  # the checkpoint's rotary dimensions come in pairs (DeepSeek)
    rotated: int = 0  # "proportional": the dimensions with a nonzero frequency (the rest pass unrotated)

    def inv_freq(self) -> torch.Tensor:
        """[dim / 2] fp32, on the CPU, as transformers computes them (so positions rotate identically)."""
        base = self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim)
        if self.kind == "default":
            return 1.0 / base
        if self.kind == "proportional":  # transformers' `_compute_proportional_rope_parameters`
            turning = 1.0 / self.theta ** (torch.arange(0, self.rotated, 2, dtype=torch.float) / self.dim)
            return torch.cat([turning, torch.zeros((self.dim - self.rotated) // 2)]) / self.factor
        # YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp in between.
        def correction_dim(rotations: float) -> float:
            return self.dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        return (1.0 / (self.factor * base)) * (1 - extrapolation) + (1.0 / base) * extrapolation


@dataclass(frozen=True)
class LatentAttentionConfig:
    """DeepSeek's Multi-head Latent Attention: keys and values come from a `kv_lora_rank` latent per token
    (which is what the KV cache holds, with the `rope_dim` rotary key), queries optionally from a
    `q_lora_rank` latent."""

    q_lora_rank: int | None
    kv_lora_rank: int
    nope_dim: int  # per-head query/key dimensions without rotation
    rope_dim: int  # per-head query/key dimensions with rotation (the key's are shared by all heads)
    v_dim: int

    @property
    def qk_dim(self) -> int:
        return self.nope_dim + self.rope_dim


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5): a linear-attention layer whose per-sequence cache is a fixed
    state, not keys and values per position: the last `conv_kernel - 1` inputs of its causal depthwise
    convolution over q|k|v, and an fp32 recurrent state [v_heads, k_head_dim, v_head_dim]. Each of the
    `k_heads` query/key heads serves v_heads / k_heads value heads."""

    k_heads: int
    v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.v_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: q, k and v."""
        return 2 * self.key_dim + self.value_dim

    @property
    def in_rows(self) -> int:
        """Rows of the input projection: q, k, v, the output gate z, and per value head beta's b and the decay's a."""
        return self.conv_dim + self.value_dim + 2 * self.v_heads


@dataclass(frozen=True)
class IndexerConfig:
    """DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2, GLM-5): `n_heads` heads of `head_dim` score
    each query against one cached key per past token (its own projection, LayerNorm and rotary on the first
    `rope_dim` dimensions), ReLU'd and summed with per-head weights; latent attention then sees only each
    query's `topk` best-scored past tokens. GLM-5's checkpoints rotate interleaved pairs (`interleaved`: read
    into halves, as MLA's are), and GLM-5.2's `shared` layers have no indexer: they keep what the previous
    layer with one kept."""

    n_heads: int
    head_dim: int
    topk: int
    rope_dim: int
    interleaved: bool = False
    shared: tuple[int, ...] = ()

    def own(self, layer: int) -> bool:
        """Whether layer `layer` runs (and caches keys for) an indexer of its own."""
        return layer not in self.shared


@dataclass(frozen=True)
class FullAttentionConfig:
    """Gemma 4: the full-attention layers' own geometry beside the sliding layers' (`head_dim`, KV heads and
    rotary of the ModelConfig), and values that are the keys' projection (`k_eq_v`: no v_proj)."""

    head_dim: int
    n_kv_heads: int
    k_eq_v: bool
    rope: RopeConfig


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    dim: int  # hidden size
    ffn_dim: int  # one routed expert's intermediate size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype | None  # as declared in config.json, if it says
    # which layers have routed experts; the others have a dense MLP of `dense_ffn_dim`, kept resident
    moe_layers: tuple[int, ...] | None = None  # None: every layer
    dense_ffn_dim: int = 0
    router: RouterConfig = field(default_factory=RouterConfig)
    shared_ffn_dim: int = 0  # a shared expert every token uses (resident); 0: none
    shared_gate: bool = False  # Qwen2-MoE scales the shared expert by sigmoid(a learned gate)
    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3, GLM); "proj": over the whole projection (OLMoE)
    clip_qkv: float | None = None
    layer_windows: tuple[int | None, ...] | None = None  # sliding window per layer (None: full attention); None: no window
    mla: LatentAttentionConfig | None = None
    attn_scale: float = 0.0  # softmax scale; 0: 1/sqrt(query-key dimension)
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit in each softmax's denominator
    router_bias: bool = False  # gpt-oss's router has a bias
    # routed experts: SwiGLU ("silu"), GeGLU with tanh's GELU ("gelu_tanh", Gemma 4) or gpt-oss's clamped
    # variant ("swiglu_oai": up and gate clamped to `swiglu_limit`, (up + 1) * gate * sigmoid(alpha * gate)),
    # with biases or not
    expert_act: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    mxfp4_experts: bool = False  # the checkpoint holds the routed experts as MXFP4 blocks and scales
    # hybrids (Qwen3-Next, Qwen3.5): the layers listed in `linear_layers` are Gated DeltaNet linear attention
    # (`linear`), the others full attention
    linear: LinearAttentionConfig | None = None
    linear_layers: tuple[int, ...] = ()
    attn_gate: bool = False  # the q projection also gives a per-head output gate: attention * sigmoid(gate)
    norm_offset: bool = False  # zero-centred RMSNorm weights: the norms scale by 1 + w (Qwen3-Next, Qwen3.5)
    indexer: IndexerConfig | None = None  # DeepSeek Sparse Attention over `mla`
    # Gemma 4
    full_attention: FullAttentionConfig | None = None  # the full layers' geometry, where it differs
    v_norm: bool = False  # values RMS-normalised per head, without a scale
    # a norm on the attention's output and on the feed-forward's before each residual sum, and each layer's
    # output times a learned scalar
    sandwich_norms: bool = False
    # the shared expert (`shared_ffn_dim`) is a dense MLP with a norm before and after it, and the routed
    # experts' input and output have norms of their own
    expert_norms: bool = False
    dense_act: str = "silu"  # dense MLPs and shared experts: SwiGLU ("silu") or GeGLU with tanh's GELU ("gelu_tanh")
    embed_scale: float = 1.0  # the embeddings times this (in their dtype)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0: none
    # how the checkpoint's quantized matrices are stored (FP8 blocks, compressed-tensors int4), if any are
    quantization: schemes.Scheme | None = None

    def __post_init__(self) -> None:
        # None, not an empty tuple, means "every layer": a family whose rule leaves no MoE layer (every Qwen
        # layer in mlp_only_layers) must reach from_hf's dense-model check
        if self.moe_layers is None:
            object.__setattr__(self, "moe_layers", tuple(range(self.n_layers)))
        if self.layer_windows is None:
            object.__setattr__(self, "layer_windows", (None,) * self.n_layers)

    @classmethod
    def from_hf(cls, raw: dict) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError("config.json is not a JSON object")
        model_type = raw.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise ConfigError(
                f"unsupported model_type {model_type!r} in config.json "
                f"(supported: {', '.join(FAMILIES)})"
            )
        fields = _Fields(raw)
        try:
            cfg = family.config(fields)
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:
            name = fields.culprit(e)
            raise ConfigError(f"config.json has a malformed field{f' {name!r}' if name else ''}: {e}") from None
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {raw['hidden_act']!r} (only silu)")
        if cfg.n_experts < 1 or not cfg.moe_layers:
            raise ConfigError(f"config.json describes a dense model with no routed experts; moe-local runs MoE models ({', '.join(FAMILIES)})")
        if not 0 < cfg.top_k <= cfg.n_experts:
            raise ConfigError(f"num_experts_per_tok={cfg.top_k} must be between 1 and the number of experts ({cfg.n_experts})")
        if cfg.n_heads % cfg.n_kv_heads:
            raise ConfigError(f"num_attention_heads={cfg.n_heads} is not a multiple of num_key_value_heads={cfg.n_kv_heads}")
        r = cfg.router
        if r.n_group < 1 or cfg.n_experts % r.n_group or not 1 <= r.topk_group <= r.n_group:
            raise ConfigError(f"n_group={r.n_group} / topk_group={r.topk_group} do not divide {cfg.n_experts} experts into groups")
        if r.topk_group * (cfg.n_experts // r.n_group) < cfg.top_k:
            raise ConfigError(f"topk_group={r.topk_group} groups hold fewer experts than num_experts_per_tok={cfg.top_k}")
        return cfg

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def sliding_window(self) -> int | None:
        """The widest sliding window of any layer (None if every layer attends to the whole context)."""
        windows = [w for w in self.layer_windows if w]
        return max(windows) if len(windows) == self.n_layers else None

    def layer_geometry(self, layer: int) -> tuple[int, int]:
        """(head_dim, KV heads) of layer `layer`'s attention: a full layer's own where the family has them."""
        full = self.full_attention
        if full is not None and self.layer_windows[layer] is None:
            return full.head_dim, full.n_kv_heads
        return self.head_dim, self.n_kv_heads

    def values_from_keys(self, layer: int) -> bool:
        """Whether layer `layer`'s values are its keys' projection (before the keys' norm and rotary)."""
        return self.full_attention is not None and self.full_attention.k_eq_v and self.layer_windows[layer] is None

    def layer_rope(self, layer: int) -> RopeConfig:
        full = self.full_attention
        return full.rope if full is not None and self.layer_windows[layer] is None else self.rope

    @property
    def expert_numel(self) -> int:
        """Parameters of one routed expert: w1 [F, D], w2 [D, F], w3 [F, D] (and their biases)."""
        return 3 * self.ffn_dim * self.dim + (2 * self.ffn_dim + self.dim) * self.expert_bias

    @property
    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """One routed expert's tensors as the formats pack them: gate w1, down w2, up w3 and, for families
        with expert biases, their biases b1, b2, b3."""
        f, d = self.ffn_dim, self.dim
        shapes = {"w1": (f, d), "w2": (d, f), "w3": (f, d)}
        return shapes | ({"b1": (f,), "b2": (d,), "b3": (f,)} if self.expert_bias else {})

    def layer_attention_shapes(self, layer: int) -> list[tuple[int, int]]:
        """[N, K] of each of layer `layer`'s attention projections (matrices `--resident-dtype` quantizes).
        Where values are the keys' projection (Gemma 4's full layers, `k_eq_v`), q|k has no value rows."""
        d, h = self.dim, self.n_heads
        if self.mla is None:
            hd, hkv = self.layer_geometry(layer)
            kv = hkv * (1 + (not self.values_from_keys(layer)))  # no value rows where values are the keys
            return [((h * (1 + self.attn_gate) + kv) * hd, d), (d, h * hd)]  # q(|gate)|k|v, o
        m = self.mla  # kv_b stays unquantized (see LatentAttention.quantize)
        q = [(h * m.qk_dim, d)] if m.q_lora_rank is None else [(m.q_lora_rank, d), (h * m.qk_dim, m.q_lora_rank)]
        return [*q, (m.kv_lora_rank + m.rope_dim, d), (d, h * m.v_dim)]

    @property
    def full_layers(self) -> list[int]:
        """The layers with (softmax) attention: all but the linear-attention ones."""
        return [i for i in range(self.n_layers) if i not in self.linear_layers]

    @property
    def attention_shapes(self) -> list[tuple[int, int]]:
        """Every distinct [N, K] of the full layers' attention projections (Gemma 4's sliding and full layers differ)."""
        return list(dict.fromkeys(s for i in self.full_layers for s in self.layer_attention_shapes(i)))

    @property
    def attention_numel(self) -> int:
        """Weights of every full layer's attention projections."""
        return sum(n * k for i in self.full_layers for n, k in self.layer_attention_shapes(i))

    @property
    def attention_rows(self) -> int:
        """Output channels of every full layer's attention projections (one int8 scale each)."""
        return sum(n for i in self.full_layers for n, _ in self.layer_attention_shapes(i))

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """[N, K] of one linear-attention layer's projections: q|k|v|z|b|a in, out."""
        lin = self.linear
        return [(lin.in_rows, self.dim), (self.dim, lin.value_dim)] if lin is not None else []

    @property
    def n_full_layers(self) -> int:
        return self.n_layers - len(self.linear_layers)

    @property
    def projection_shapes(self) -> list[tuple[int, int]]:
        """The [N, K] shapes among all layers' attention projections (what `--resident-dtype` quantizes, with the
        MLPs' `mlp_matrices`)."""
        return (self.attention_shapes if self.n_full_layers else []) + (self.linear_shapes if self.linear_layers else [])

    @property
    def projection_numel(self) -> int:
        """Weights of every layer's attention projections, full and linear."""
        linear = sum(n * k for n, k in self.linear_shapes)
        return self.attention_numel + len(self.linear_layers) * linear

    @property
    def projection_rows(self) -> int:
        """Output channels of every layer's attention projections (one int8 scale each)."""
        linear = sum(n for n, _ in self.linear_shapes)
        return self.attention_rows + len(self.linear_layers) * linear

    def linear_extra_numel(self) -> int:
        """One linear-attention layer's parameters beside its projections: conv weights, A_log, dt_bias, the gated norm."""
        lin = self.linear
        return lin.conv_dim * lin.conv_kernel + 2 * lin.v_heads + lin.v_head_dim

    def attention_extra_numel(self, layer: int = 0) -> int:
        """Layer `layer`'s attention parameters beside its matrices of `attention_numel`: biases, norms (and
        MLA's kv_b)."""
        d, h = self.dim, self.n_heads
        hd, hkv = self.layer_geometry(layer)
        if self.mla is not None:  # norms, kv_b and the biases of q_a, kv_a and o
            m = self.mla
            biases = ((m.q_lora_rank or 0) + m.kv_lora_rank + m.rope_dim) * self.qkv_bias + d * self.o_bias
            ix = self.indexer  # its q, k and weights projections and its LayerNorm, unquantized
            own = ix is not None and ix.own(layer)
            index = 0 if not own else ix.n_heads * ix.head_dim * (m.q_lora_rank or 0) + ix.head_dim * (d + 2) + ix.n_heads * d
            return (m.q_lora_rank or 0) + m.kv_lora_rank + m.kv_lora_rank * h * (m.nope_dim + m.v_dim) + biases + index
        n = (h * (1 + self.attn_gate) + hkv * (1 + (not self.values_from_keys(layer)))) * hd * self.qkv_bias + d * self.o_bias + h * self.attn_sinks
        if self.qk_norm == "head":
            n += 2 * hd
        elif self.qk_norm == "proj":
            n += (h + hkv) * hd
        return n

    @property
    def mlp_matrices(self) -> list[tuple[int, int]]:
        """[N, K] of every resident MLP matrix, one entry each: the dense layers' and the shared experts' (Gemma 4's
        dense MLP beside its experts) w13 [2F, D] and w2 [D, F], what `--resident-dtype` quantizes beside the
        attention projections (not the shared experts' one-row gates)."""
        d = self.dim
        dense = (self.n_layers - self.n_moe_layers) * [(2 * self.dense_ffn_dim, d), (d, self.dense_ffn_dim)]
        shared = self.n_moe_layers * [(2 * self.shared_ffn_dim, d), (d, self.shared_ffn_dim)]
        return [(n, k) for n, k in dense + shared if n * k]

    @property
    def mlp_shapes(self) -> list[tuple[int, int]]:
        """Every distinct [N, K] of `mlp_matrices`."""
        return list(dict.fromkeys(self.mlp_matrices))

    def dense_numel(self) -> int:
        """Resident feed-forward parameters: the dense MLP layers and every shared expert (with its gate)."""
        return sum(n * k for n, k in self.mlp_matrices) + self.n_moe_layers * self.dim * self.shared_gate

    def resident_numel(self) -> int:
        """Parameters that stay on the device: everything except the routed experts."""
        d = self.dim
        # the attention's norm and the feed-forward's (Gemma 4: norms after both and a scalar; its MoE's four
        # norms, before and after the dense MLP and the routed experts, instead of the feed-forward's)
        norms = self.n_layers * (2 * d + (2 * d + 1) * self.sandwich_norms) + self.n_moe_layers * 3 * d * self.expert_norms
        attention = self.projection_numel + sum(self.attention_extra_numel(i) for i in self.full_layers)
        if self.linear_layers:
            attention += len(self.linear_layers) * self.linear_extra_numel()
        per_router = d + self.router.correction_bias + self.router_bias + self.router.expert_scale
        routers = self.n_moe_layers * (self.n_experts * per_router + d * self.router.input_scale)
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return norms + attention + routers + self.dense_numel() + embed + head + d

    def cache_positions(self, layer: int, ctx_size: int) -> int:
        """Positions layer `layer`'s KV cache holds: the context, or only the window of a sliding layer."""
        window = self.layer_windows[layer]
        return min(window, ctx_size) if window else ctx_size

    def kv_cache_numel(self, ctx_size: int) -> int:
        """Values the KV cache holds for `ctx_size` tokens: keys and values per KV head (a sliding layer
        only its window's), or with MLA the compressed latent and the shared rotary key (and DeepSeek-V3.2's
        indexer key, in the layers with an indexer of their own); linear-attention layers hold none (their
        fixed state is `sequence_state_bytes`)."""
        if self.mla is not None:
            ix = self.indexer
            index = 0 if ix is None else ix.head_dim * sum(ix.own(i) for i in range(self.n_layers))
            return ctx_size * (self.n_layers * (self.mla.kv_lora_rank + self.mla.rope_dim) + index)
        return sum(2 * self.cache_positions(i, ctx_size) * math.prod(self.layer_geometry(i)) for i in self.full_layers)

    def sequence_state_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of a sequence's fixed state, whatever its length: per linear-attention layer the last
        conv_kernel - 1 inputs of its convolution (in `dtype`) and its fp32 recurrent state."""
        lin = self.linear
        if lin is None:
            return 0
        per_layer = lin.conv_dim * (lin.conv_kernel - 1) * dtype.itemsize + lin.v_heads * lin.k_head_dim * lin.v_head_dim * 4
        return len(self.linear_layers) * per_layer

    def kv_cache_bytes(self, ctx_size: int, dtype: torch.dtype) -> int:
        """Bytes one sequence's cache takes for `ctx_size` tokens: the keys and values of `kv_cache_numel` in
        `dtype` and the fixed state of linear-attention layers."""
        return self.kv_cache_numel(ctx_size) * dtype.itemsize + self.sequence_state_bytes(dtype)

    def parameter_counts(self) -> dict[str, int]:
        """What `info` and `plan` report: all parameters, those one token uses (the resident part and top_k
        routed experts per MoE layer), and where they are. Model cards count the active ones two ways: with the
        token embedding table (Mixtral's 12.9 B, Qwen3-30B-A3B's 3.3 B, OLMoE's 1.3 B) or without it, since a
        token reads one row of it (gpt-oss-20b's 3.6 B, gpt-oss-120b's 5.1 B); both are here. A table tied to
        lm_head is read whole by every token, so it counts either way."""
        routed = self.n_moe_layers * self.n_experts * self.expert_numel
        resident = self.resident_numel()
        active = resident + self.n_moe_layers * self.top_k * self.expert_numel
        return {
            "total": resident + routed,
            "active_per_token": active,
            "active_without_embeddings": active - (0 if self.tie_word_embeddings else self.vocab_size * self.dim),
            "resident": resident,
            "routed_experts": routed,
            "per_expert": self.expert_numel,
            "dense_and_shared_mlp": self.dense_numel(),
        }


# ---- reading config.json: the pieces shared by the families, then one function per family ----------


def _eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _rope_params(raw: dict) -> dict:
    """`rope_parameters` (transformers >= 5) over `rope_scaling` (the published files)."""
    return {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}


def _rope(raw: dict, head_dim: int, interleaved: bool = False) -> RopeConfig:
    """RoPE from `rope_parameters` or `rope_theta` + `rope_scaling`."""
    params = _rope_params(raw)
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    factor = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    dim = int(head_dim * factor)
    if kind == "default":
        return RopeConfig(theta, dim, interleaved=interleaved)
    if kind != "yarn":
        raise ConfigError(f"unsupported RoPE scaling {kind!r} in config.json (supported: default, yarn)")
    original = _int(params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings") or raw["max_position_embeddings"])
    scale = params.get("factor")
    scale = float(scale) if scale is not None else raw["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(scale, mscale) / yarn_mscale(scale, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(scale)
    return RopeConfig(
        theta, dim, "yarn", scale, original, float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1),
        bool(params.get("truncate", True)), float(attention_factor), interleaved,
    )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _windows(raw: dict, n_layers: int) -> tuple[int | None, ...]:
    """Sliding windows per layer: `layer_types` where the file has them, else Mixtral's one window for all."""
    window = raw.get("sliding_window") or None
    types = raw.get("layer_types")
    if types:
        if len(types) != n_layers:
            raise ConfigError(f"layer_types lists {len(types)} layers, num_hidden_layers says {n_layers}")
        return tuple(_int(window) if t == "sliding_attention" and window else None for t in types)
    if raw.get("use_sliding_window"):
        raise ConfigError("use_sliding_window without layer_types is not supported")
    return (_int(window) if window else None,) * n_layers


def _int(value) -> int:
    """A config field that counts something: int() of it, refusing a fraction int() would silently cut."""
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"not a whole number: {value!r}")
    return int(value)


class _Fields(dict):
    """config.json's fields, remembering which were read, so that a value int() or float() refuses (or a zero
    that divides) can be named: the field read last whose value is the one the error quotes."""

    def __init__(self, raw: dict):
        super().__init__(raw)
        self.read: list[str] = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.append(key)
        return super().get(key, default)

    def with_defaults(self, **defaults) -> _Fields:
        """These fields with `defaults` for those they lack, recording into the same list."""
        out = _Fields({**defaults, **self})
        out.read = self.read
        return out

    def culprit(self, error: Exception) -> str | None:
        def quoted(value) -> bool:
            if isinstance(error, ZeroDivisionError):
                return value == 0 and not isinstance(value, bool)
            if isinstance(error, TypeError):  # "int() argument must be ..., not 'NoneType'"
                return f"not '{type(value).__name__}'" in str(error)
            return str(error).endswith(f": {value!r}")  # "invalid literal for int() ...: 'x'", _int's "...: 8.5"

        return next((key for key in reversed(self.read) if key in self and quoted(dict.__getitem__(self, key))), None)


def _common(raw: dict, **fields) -> dict:
    """Fields read the same way by every family; a family's own fields come in `fields`."""
    dim, n_heads = _int(raw["hidden_size"]), _int(raw["num_attention_heads"])
    n_layers = _int(raw["num_hidden_layers"])
    head_dim = _int(raw.get("head_dim") or dim // n_heads)
    out = dict(
        model_type=raw["model_type"],
        vocab_size=_int(raw["vocab_size"]),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_int(raw.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        top_k=_int(raw["num_experts_per_tok"]),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=_int(raw.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        dtype=DTYPES.get(raw.get("dtype") or raw.get("torch_dtype") or ""),
        layer_windows=_windows(raw, n_layers),
        quantization=schemes.scheme(raw.get("quantization_config")),
    )
    out.update(fields)
    if "rope" not in out:
        out["rope"] = _rope(raw, out["head_dim"])
    return out


def _n_experts(raw: dict, *names: str) -> int:
    for name in names:
        if raw.get(name) is not None:
            return _int(raw[name])
    raise KeyError(names[0])


def _qwen_moe_layers(raw: dict) -> tuple[int, ...]:
    """Qwen's rule: layer i is sparse unless listed in mlp_only_layers or off the decoder_sparse_step."""
    step, dense = _int(raw.get("decoder_sparse_step") or 1), set(raw.get("mlp_only_layers") or ())
    return tuple(i for i in range(_int(raw["num_hidden_layers"])) if i not in dense and (i + 1) % step == 0)


def _first_k_dense(raw: dict) -> tuple[int, ...]:
    return tuple(range(_int(raw.get("first_k_dense_replace") or 0), _int(raw["num_hidden_layers"])))


def mixtral(raw: dict) -> ModelConfig:
    raw = raw.with_defaults(rope_theta=1e6) if isinstance(raw, _Fields) else {"rope_theta": 1e6, **raw}  # Mixtral's default
    return ModelConfig(**_common(
        raw, n_experts=_int(raw["num_local_experts"]), ffn_dim=_int(raw["intermediate_size"]),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
    ))


def qwen3_moe(raw: dict) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "num_experts", "num_local_experts"), ffn_dim=_int(raw["moe_intermediate_size"]),
        dense_ffn_dim=_int(raw.get("intermediate_size") or 0), moe_layers=_qwen_moe_layers(raw),
        router=RouterConfig(renormalize=bool(raw.get("norm_topk_prob", False))),
        qkv_bias=bias, o_bias=bias, qk_norm="head",
    ))


def qwen2_moe(raw: dict) -> ModelConfig:
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "num_experts", "num_local_experts"), ffn_dim=_int(raw["moe_intermediate_size"]),
        dense_ffn_dim=_int(raw.get("intermediate_size") or 0), moe_layers=_qwen_moe_layers(raw),
        router=RouterConfig(renormalize=bool(raw.get("norm_topk_prob", False))),
        shared_ffn_dim=_int(raw.get("shared_expert_intermediate_size") or 0), shared_gate=True,
        qkv_bias=bool(raw.get("qkv_bias", True)),
    ))


def olmoe(raw: dict) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    clip = raw.get("clip_qkv")
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "num_experts", "num_local_experts"), ffn_dim=_int(raw["intermediate_size"]),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        router=RouterConfig(renormalize=bool(raw.get("norm_topk_prob", False))),
        qkv_bias=bias, o_bias=bias, qk_norm="proj", clip_qkv=float(clip) if clip is not None else None,
    ))


# transformers' Qwen3NextConfig defaults (5.24), for fields a config.json may leave out
_QWEN_NEXT_DEFAULTS = dict(head_dim=256, num_key_value_heads=2, partial_rotary_factor=0.25, linear_num_key_heads=16,
                           linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                           linear_conv_kernel_dim=4, full_attention_interval=4, norm_topk_prob=True)


def _hybrid(raw: dict, **fields) -> ModelConfig:
    """Qwen3-Next and Qwen3.5-MoE: Gated DeltaNet layers with gated full attention every
    `full_attention_interval`-th layer (or as `layer_types` lists them), zero-centred norms, partial rotary,
    per-head q/k norm, softmax top-k routing and a shared expert under a sigmoid gate."""
    raw = {**_QWEN_NEXT_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    if raw.get("hidden_act", "silu") != "silu":  # text_config's, for the multimodal file
        raise ConfigError(f"unsupported hidden_act {raw['hidden_act']!r} (only silu)")
    n_layers, interval = _int(raw["num_hidden_layers"]), _int(raw["full_attention_interval"])
    types = raw.get("layer_types") or ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers:
        raise ConfigError(f"layer_types lists {len(types)} layers, num_hidden_layers says {n_layers}")
    if unknown := set(types) - {"linear_attention", "full_attention"}:
        raise ConfigError(f"unsupported layer type {sorted(unknown)[0]!r} in layer_types (linear_attention, full_attention)")
    linear = LinearAttentionConfig(
        k_heads=_int(raw["linear_num_key_heads"]), v_heads=_int(raw["linear_num_value_heads"]),
        k_head_dim=_int(raw["linear_key_head_dim"]), v_head_dim=_int(raw["linear_value_head_dim"]),
        conv_kernel=_int(raw["linear_conv_kernel_dim"]),
    )
    if linear.v_heads % linear.k_heads:
        raise ConfigError(f"linear_num_value_heads={linear.v_heads} is not a multiple of linear_num_key_heads={linear.k_heads}")
    if linear.conv_kernel < 2:
        raise ConfigError(f"linear_conv_kernel_dim={linear.conv_kernel} must be at least 2")
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(**_common(
        {**raw, "layer_types": None}, n_experts=_n_experts(raw, "num_experts", "num_local_experts"),
        ffn_dim=_int(raw["moe_intermediate_size"]), router=RouterConfig(renormalize=bool(raw["norm_topk_prob"])),
        shared_ffn_dim=_int(raw.get("shared_expert_intermediate_size") or 0), shared_gate=True,
        qkv_bias=bias, o_bias=bias, qk_norm="head", attn_gate=True, norm_offset=True, linear=linear,
        linear_layers=tuple(i for i, t in enumerate(types) if t == "linear_attention"), **fields,
    ))


def qwen3_next(raw: dict) -> ModelConfig:
    return _hybrid(raw, dense_ffn_dim=_int(raw.get("intermediate_size") or 0), moe_layers=_qwen_moe_layers(raw))


def qwen3_5_moe_text(raw: dict) -> ModelConfig:
    """Qwen3.5/3.6-MoE's text model as transformers saves it alone (`Qwen3_5MoeForCausalLM`): every layer
    is MoE, the router always renormalises."""
    return _hybrid({**raw, "norm_topk_prob": True})


def qwen3_5_moe(raw: dict) -> ModelConfig:
    """The published multimodal checkpoint (`Qwen3_5MoeForConditionalGeneration`): the text model's fields
    are in `text_config` (what the top level says of the word embeddings, dtype and quantization holds for it:
    the `-FP8` repos' quantization_config is at the top level); the vision tower is not read."""
    text = dict(raw["text_config"])
    for name in ("tie_word_embeddings", "dtype", "torch_dtype", "quantization_config"):
        if name in raw:
            text[name] = raw[name]
    return qwen3_5_moe_text({**text, "model_type": raw["model_type"]})


def _sigmoid_router(raw: dict) -> RouterConfig:
    """GLM-4.5 and DeepSeek-V3 (`noaux_tc`): sigmoid scores, a selection bias, groups scored by their best two."""
    return RouterConfig(
        scoring="sigmoid", renormalize=bool(raw.get("norm_topk_prob", True)),
        scaling=float(raw.get("routed_scaling_factor") or 1.0), n_group=_int(raw.get("n_group") or 1),
        topk_group=_int(raw.get("topk_group") or 1), group_score="top2", correction_bias=True, fp32=True,
    )


def glm4_moe(raw: dict) -> ModelConfig:
    n_shared = _int(raw.get("n_shared_experts") or 0)
    ffn = _int(raw["moe_intermediate_size"])
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "n_routed_experts", "num_local_experts"), ffn_dim=ffn,
        dense_ffn_dim=_int(raw["intermediate_size"]), moe_layers=_first_k_dense(raw), router=_sigmoid_router(raw),
        shared_ffn_dim=ffn * n_shared, qkv_bias=bool(raw.get("attention_bias", False)),
        qk_norm="head" if raw.get("use_qk_norm") else None,
    ))


def _deepseek(raw: dict, router: RouterConfig, interleaved: bool) -> ModelConfig:
    mla = LatentAttentionConfig(
        q_lora_rank=_int(raw["q_lora_rank"]) if raw.get("q_lora_rank") else None,
        kv_lora_rank=_int(raw["kv_lora_rank"]), nope_dim=_int(raw["qk_nope_head_dim"]),
        rope_dim=_int(raw["qk_rope_head_dim"]), v_dim=_int(raw["v_head_dim"]),
    )
    rope = _rope(raw, mla.rope_dim, interleaved)
    scale = mla.qk_dim**-0.5
    params = _rope_params(raw)
    if rope.kind != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(rope.factor, params["mscale_all_dim"]) ** 2
    ffn = _int(raw["moe_intermediate_size"])
    bias = bool(raw.get("attention_bias", False))
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "n_routed_experts", "num_local_experts"), ffn_dim=ffn,
        dense_ffn_dim=_int(raw["intermediate_size"]), moe_layers=_first_k_dense(raw), router=router,
        shared_ffn_dim=ffn * _int(raw.get("n_shared_experts") or 0), head_dim=mla.qk_dim, rope=rope, mla=mla,
        attn_scale=scale, qkv_bias=bias, o_bias=bias,
    ))


def deepseek_v2(raw: dict) -> ModelConfig:
    method = raw.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"unsupported topk_method {method!r} for deepseek_v2 (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    # transformers' DeepseekV2 router does not renormalise (whatever norm_topk_prob says); we follow it
    router = RouterConfig(
        renormalize=False, scaling=float(raw.get("routed_scaling_factor") or 1.0),
        n_group=_int(raw.get("n_group") or 1) if grouped else 1, topk_group=_int(raw.get("topk_group") or 1) if grouped else 1,
        fp32=True,
    )
    return _deepseek(raw, router, interleaved=True)


def deepseek_v3(raw: dict) -> ModelConfig:
    if raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"unsupported topk_method {raw['topk_method']!r} for deepseek_v3 (noaux_tc)")
    return _deepseek(raw, _sigmoid_router(raw), interleaved=bool(raw.get("rope_interleave", True)))


def minimax_m2(raw: dict) -> ModelConfig:
    """MiniMax-M2: OLMoE's q/k norms over the whole projections, a rotated part of each head (the published
    files say `rotary_dim`, transformers' `partial_rotary_factor`), a sigmoid router with a selection bias
    and renormalised weights, no groups, its matmul in the model's dtype as transformers does."""
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"unsupported scoring_func {raw['scoring_func']!r} for minimax_m2 (sigmoid)")
    head_dim = _int(raw.get("head_dim") or _int(raw["hidden_size"]) // _int(raw["num_attention_heads"]))
    if raw.get("rotary_dim") and "partial_rotary_factor" not in _rope_params(raw):
        raw = {"partial_rotary_factor": _int(raw["rotary_dim"]) / head_dim, **raw}
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "num_local_experts", "num_experts"), ffn_dim=_int(raw["intermediate_size"]),
        router=RouterConfig(scoring="sigmoid", renormalize=True, correction_bias=True), qk_norm="proj",
    ))


GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # transformers' names for GELU's tanh approximation


def _gemma4_rope(params: dict | None, head_dim: int, kind_default: str) -> RopeConfig:
    """One layer type's `rope_parameters` entry: "default", or "proportional" (frequencies over the whole
    head, `partial_rotary_factor` of it turning)."""
    params = params or {}
    kind = params.get("rope_type", kind_default)
    theta, factor = float(params["rope_theta"]), float(params.get("factor") or 1.0)
    if kind == "default" and factor == 1.0:
        return RopeConfig(theta, head_dim)
    if kind != "proportional":
        raise ConfigError(f"unsupported RoPE {kind!r} for gemma4 (default, proportional)")
    rotated = 2 * int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    return RopeConfig(theta, head_dim, "proportional", factor=factor, rotated=rotated)


def gemma4_text(raw: dict) -> ModelConfig:
    """Gemma 4's text model with `enable_moe_block` (26B-A4B): sliding layers and full ones with their own
    head size, KV heads, rotary and (k_eq_v) values that are the keys' projection; per-head q/k norms and an
    unscaled v norm; attention unscaled (the norms do it); sandwich norms and a learned scalar per layer; in
    every layer a dense GeGLU MLP and the routed experts side by side, each with its norms; embeddings times
    sqrt(D), logits soft-capped. What the MoE checkpoint does not use is refused: per-layer input embeddings
    (E2B/E4B), shared KV layers, double-wide MLPs, bidirectional attention."""
    if not raw.get("enable_moe_block"):
        raise ConfigError("gemma4 without enable_moe_block is a dense model; moe-local runs the MoE one (26B-A4B)")
    for name, off in (("hidden_size_per_layer_input", 0), ("num_kv_shared_layers", 0), ("use_double_wide_mlp", False)):
        if raw.get(name) not in (None, off):
            raise ConfigError(f"unsupported {name}={raw[name]!r} for gemma4 (the MoE model has none)")
    if raw.get("use_bidirectional_attention") == "all":
        raise ConfigError("unsupported use_bidirectional_attention='all' for gemma4 (causal text only)")
    act = raw.get("hidden_activation", GELU_TANH[0])
    if act not in GELU_TANH:
        raise ConfigError(f"unsupported hidden_activation {act!r} for gemma4 ({GELU_TANH[0]})")
    n_layers, dim = _int(raw["num_hidden_layers"]), _int(raw["hidden_size"])
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)]
    types = [*types[:-1], "full_attention"]  # transformers forces the last layer to full attention
    head_dim, n_kv = _int(raw.get("head_dim") or 256), _int(raw.get("num_key_value_heads") or raw["num_attention_heads"])
    k_eq_v = bool(raw.get("attention_k_eq_v", False))
    # the full layers' geometry: transformers' per_layer_config where a saved file has it, else the published
    # fields (global_head_dim, and num_global_key_value_heads where keys are values)
    per_layer = raw.get("per_layer_config") or {}
    full = [per_layer.get(str(i), per_layer.get(i)) for i, t in enumerate(types) if t == "full_attention"]
    if per_layer and full and full[0]:
        full_dim, full_kv = _int(full[0].get("head_dim", head_dim)), _int(full[0].get("num_key_value_heads", n_kv))
    else:
        full_dim = _int(raw.get("global_head_dim") or 512)
        full_kv = _int(raw.get("num_global_key_value_heads") or n_kv) if k_eq_v else n_kv
    ropes = raw.get("rope_parameters") or {}
    rope = _gemma4_rope(ropes.get("sliding_attention") or {"rope_theta": 10000.0}, head_dim, "default")
    full_rope = _gemma4_rope(ropes.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                             "rope_theta": 1e6}, full_dim, "default")
    softcap = raw.get("final_logit_softcapping")
    raw = {"sliding_window": 512, "tie_word_embeddings": True, "max_position_embeddings": 131072, "bos_token_id": 2,
           "eos_token_id": 1, **raw, "layer_types": types, "head_dim": head_dim, "num_key_value_heads": n_kv,
           "num_experts_per_tok": raw["top_k_experts"]}
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "num_experts"), ffn_dim=_int(raw["moe_intermediate_size"]),
        rope=rope,
        router=RouterConfig(input_scale=True, expert_scale=True), shared_ffn_dim=_int(raw["intermediate_size"]),
        qk_norm="head", attn_scale=1.0, o_bias=bool(raw.get("attention_bias", False)),
        qkv_bias=bool(raw.get("attention_bias", False)), expert_act="gelu_tanh", dense_act="gelu_tanh",
        full_attention=FullAttentionConfig(full_dim, full_kv, k_eq_v, full_rope), v_norm=True, sandwich_norms=True,
        expert_norms=True, embed_scale=dim**0.5, logit_softcap=float(softcap or 0.0),
    ))


def gemma4(raw: dict) -> ModelConfig:
    """Gemma 4's multimodal checkpoint (Gemma4ForConditionalGeneration): its text model, from `text_config`;
    the vision and audio towers are not read."""
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("gemma4's config.json has no text_config")
    top = {k: raw[k] for k in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "dtype", "torch_dtype") if k in raw}
    return replace(gemma4_text({**text, **top}), model_type="gemma4")


def _sparse(raw: dict, cfg: ModelConfig, n_heads: int, interleaved: bool = False, shared: tuple[int, ...] = ()) -> ModelConfig:
    """`cfg` (MLA with a query latent) with the lightning indexer (`n_heads`: the family's default)."""
    if cfg.mla.q_lora_rank is None:
        raise ConfigError(f"{cfg.model_type} needs q_lora_rank: its indexer reads MLA's query latent")
    indexer = IndexerConfig(_int(raw.get("index_n_heads") or n_heads), _int(raw.get("index_head_dim") or 128),
                            _int(raw.get("index_topk") or 2048), cfg.mla.rope_dim, interleaved, shared)
    if not 0 < indexer.rope_dim <= indexer.head_dim or indexer.topk < 1:
        raise ConfigError(f"index_head_dim={indexer.head_dim} / index_topk={indexer.topk} do not fit qk_rope_head_dim={indexer.rope_dim}")
    return replace(cfg, indexer=indexer)


def deepseek_v32(raw: dict) -> ModelConfig:
    """DeepSeek-V3.2: DeepSeek-V3 with the lightning indexer in every layer (its query from MLA's query latent)."""
    if not raw.get("q_lora_rank"):
        raise ConfigError("deepseek_v32 needs q_lora_rank: its indexer reads MLA's query latent")
    return _sparse(raw, deepseek_v3({"topk_method": "noaux_tc", **raw}), 64)


def _layer_kinds(raw: dict, name: str, kinds: tuple[str, str], n_layers: int) -> list[str] | None:
    """A per-layer list of config.json (`mlp_layer_types`, `indexer_types`), checked; None where it is absent."""
    types = raw.get(name)
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != n_layers or any(t not in kinds for t in types):
        raise ConfigError(f"config.json's {name} must list {' or '.join(map(repr, kinds))} for each of the {n_layers} layers")
    return types


def _indexer_types(raw: dict, n_layers: int) -> list[str]:
    """Which layers run their own indexer ("full") and which keep the previous full layer's choice ("shared"),
    as transformers' GlmMoeDsaConfig reads it: `indexer_types`, else `index_topk_pattern` ("FSSS..."), else
    `index_topk_freq` / `index_skip_topk_offset` (every layer full by default; GLM-5.2: 4 and 3, so layers 0-2
    and every fourth from 6 are full)."""
    types = _layer_kinds(raw, "indexer_types", ("full", "shared"), n_layers)
    if types is None and (pattern := raw.get("index_topk_pattern")) is not None:
        letters = {"F": "full", "S": "shared"}
        types = _layer_kinds({"index_topk_pattern": [letters.get(c, c) for c in pattern]}, "index_topk_pattern", ("full", "shared"), n_layers)
    if types is None:
        freq, offset = max(_int(raw.get("index_topk_freq") or 1), 1), _int(raw.get("index_skip_topk_offset", 2))
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layers)]
    if types and types[0] != "full":
        raise ConfigError("glm_moe_dsa's first layer must run its indexer (indexer_types[0] = 'full'): a shared layer reuses an earlier one's choice")
    return types


def glm_moe_dsa(raw: dict) -> ModelConfig:
    """GLM-5, 5.1, 5.2 (`glm_moe_dsa`, transformers' modeling_glm_moe_dsa): DeepSeek-V3.2's sparse attention on
    GLM's geometry, the indexer's rotary in interleaved pairs as MLA's (`indexer_rope_interleave`, which the
    published files set and transformers always does), which layers are MoE from `mlp_layer_types` (else after
    `first_k_dense_replace`, 3 by default), and shared indexer layers (`_indexer_types`)."""
    n_layers = _int(raw["num_hidden_layers"])
    raw = {"topk_method": "noaux_tc", "first_k_dense_replace": 3, **raw}
    if raw["topk_method"] != "noaux_tc":
        raise ConfigError(f"unsupported topk_method {raw['topk_method']!r} for glm_moe_dsa (noaux_tc)")
    cfg = _deepseek(raw, _sigmoid_router(raw), interleaved=True)
    if (mlp := _layer_kinds(raw, "mlp_layer_types", ("dense", "sparse"), n_layers)) is not None:
        cfg = replace(cfg, moe_layers=tuple(i for i, t in enumerate(mlp) if t == "sparse"))
    types = _indexer_types(raw, n_layers)
    shared = tuple(i for i, t in enumerate(types) if t == "shared")
    return _sparse(raw, cfg, 32, interleaved=bool(raw.get("indexer_rope_interleave", True)), shared=shared)


def gpt_oss(raw: dict) -> ModelConfig:
    quant = (raw.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise ConfigError(f"unsupported quantization_config.quant_method {quant!r} for gpt_oss (mxfp4, or none)")
    bias = bool(raw.get("attention_bias", True))
    return ModelConfig(**_common(
        raw, n_experts=_n_experts(raw, "num_local_experts", "num_experts"), ffn_dim=_int(raw["intermediate_size"]),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        qkv_bias=bias, o_bias=bias, attn_sinks=True, router_bias=True, expert_act="swiglu_oai",
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)), swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        expert_bias=True, mxfp4_experts=quant == "mxfp4",
    ))


@dataclass(frozen=True)
class Family:
    """What differs between families outside the model's pieces: how config.json reads, and where the
    MoE block's tensors are in the checkpoint (the attention and norm names are shared)."""

    config: Callable[[dict], ModelConfig]
    moe: str = "mlp"  # the MoE block's module name
    expert_weights: tuple[str, str, str] = ("gate_proj", "down_proj", "up_proj")  # our w1, w2, w3
    shared: str = "shared_experts"
    router: str = "gate"
    correction_bias: str = "gate.e_score_correction_bias"  # the router's selection bias, under the MoE block
    fused_experts: bool = False  # all of a layer's experts in one [E, ...] tensor per matrix (gpt-oss, Gemma 4)
    # "interleaved": gpt-oss's [E, D, 2F] gate_up, gate and up columns alternating, [E, F, D] down, with biases;
    # "halves": transformers' own [E, 2F, D] gate_up, gate rows then up rows, [E, D, F] down (Gemma 4)
    fused_layout: str = "interleaved"
    prefix: str = "model."  # of the decoder's tensors (embeddings, layers, final norm) in the checkpoint
    ignored: tuple[str, ...] = ()  # checkpoint tensors under these prefixes are not read (vision towers, MTP heads)
    fused_linear_projections: bool = False  # Gated DeltaNet's inputs as in_proj_qkvz and in_proj_ba (Qwen3-Next)


FAMILIES: dict[str, Family] = {
    "mixtral": Family(mixtral, moe="block_sparse_moe", expert_weights=("w1", "w2", "w3")),
    "qwen3_moe": Family(qwen3_moe),
    "qwen2_moe": Family(qwen2_moe, shared="shared_expert"),
    "olmoe": Family(olmoe),
    "glm4_moe": Family(glm4_moe),
    "deepseek_v2": Family(deepseek_v2),
    "deepseek_v3": Family(deepseek_v3),
    "gpt_oss": Family(gpt_oss, router="router", fused_experts=True),
    "deepseek_v32": Family(deepseek_v32),
    "glm_moe_dsa": Family(glm_moe_dsa),
    "gemma4_text": Family(gemma4_text, moe="", router="router", fused_experts=True, fused_layout="halves"),
    "gemma4": Family(gemma4, moe="", router="router", fused_experts=True, fused_layout="halves",
                     prefix="model.language_model.",
                     ignored=("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")),
    "minimax_m2": Family(minimax_m2, moe="block_sparse_moe", expert_weights=("w1", "w2", "w3"),
                         correction_bias="e_score_correction_bias"),
    # the multi-token-prediction head (mtp.*) is not read, as transformers does not
    "qwen3_next": Family(qwen3_next, shared="shared_expert", ignored=("mtp.",), fused_linear_projections=True),
    "qwen3_5_moe_text": Family(qwen3_5_moe_text, shared="shared_expert", ignored=("mtp.",)),
    "qwen3_5_moe": Family(qwen3_5_moe, shared="shared_expert", prefix="model.language_model.", ignored=("mtp.", "model.visual.")),
}


# Geometries of published models (their config.json fields), for `plan` and `bench` without a checkpoint.
_MIXTRAL = dict(model_type="mixtral", num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False, dtype="bfloat16")
_QWEN3 = dict(model_type="qwen3_moe", vocab_size=151936, head_dim=128, num_experts=128, num_experts_per_tok=8,
              norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6, bos_token_id=151643, eos_token_id=151645,
              tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], dtype="bfloat16",
              max_position_embeddings=40960)
_DEEPSEEK = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="bfloat16", bos_token_id=0, eos_token_id=1,
                 qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000)
_GPT_OSS = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, head_dim=64,
                num_attention_heads=64, num_key_value_heads=8, num_experts_per_tok=4, sliding_window=128,
                attention_bias=True, rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                swiglu_limit=7.0, rope_theta=150000,
                rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                              "original_max_position_embeddings": 4096, "truncate": False},
                quantization_config={"quant_method": "mxfp4"}, bos_token_id=199998, eos_token_id=200002,
                dtype="bfloat16")
# Qwen3.5/3.6-MoE: the fields of the published config.json's text_config (Qwen/Qwen3.6-35B-A3B, Qwen/Qwen3.5-122B-A10B,
# Qwen/Qwen3.5-397B-A17B), read from copies of those files quoted in public code (the Hub itself is not
# reachable here); every layer MoE with one shared expert, 3 of 4 layers Gated DeltaNet
_QWEN35 = dict(model_type="qwen3_5_moe_text", vocab_size=248320, head_dim=256, num_key_value_heads=2,
               linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
               full_attention_interval=4, rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
               bos_token_id=None, eos_token_id=248044, dtype="bfloat16")
PRESETS = {
    "mixtral-8x7b": {**_MIXTRAL, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "max_position_embeddings": 32768},
    "mixtral-8x22b": {**_MIXTRAL, "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                      "num_hidden_layers": 56, "num_attention_heads": 48, "max_position_embeddings": 65536},
    "qwen3-30b-a3b": {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                      "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4},
    "qwen3-235b-a22b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4},
    "glm-4.5-air": {"model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
                    "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                    "norm_topk_prob": True, "routed_scaling_factor": 1.0, "partial_rotary_factor": 0.5,
                    "attention_bias": True, "use_qk_norm": False, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                    "max_position_embeddings": 131072, "tie_word_embeddings": False, "dtype": "bfloat16",
                    "eos_token_id": [151329, 151336, 151338]},
    "deepseek-v2-lite": {**_DEEPSEEK, "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
                         "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                         "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
                         "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                         "topk_method": "greedy", "routed_scaling_factor": 1.0, "q_lora_rank": None,
                         "kv_lora_rank": 512, "max_position_embeddings": 163840, "bos_token_id": 100000,
                         "eos_token_id": 100001,
                         "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
    "deepseek-v3": {**_DEEPSEEK, "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
                    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                    "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
                    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8,
                    "topk_group": 4, "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                    "q_lora_rank": 1536, "kv_lora_rank": 512, "max_position_embeddings": 163840,
                    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    # DeepSeek-V3.2(-Exp): DeepSeek-V3's geometry plus the indexer; the index_* figures are transformers'
    # DeepseekV32Config defaults (its docstring points at deepseek-ai/DeepSeek-V3.2-Exp; the published
    # config.json itself was not reachable)
    "deepseek-v3.2": {**_DEEPSEEK, "model_type": "deepseek_v32", "vocab_size": 129280, "hidden_size": 7168,
                      "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                      "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256,
                      "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8,
                      "topk_group": 4, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 1536,
                      "kv_lora_rank": 512, "max_position_embeddings": 163840, "index_n_heads": 64,
                      "index_head_dim": 128, "index_topk": 2048,
                      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}},
    # GLM-5 (zai-org/GLM-5, and 5.1: the same geometry): GLM-5.1's config.json as a public model report quotes it
    # (found with the search tools; the Hub is not reachable here), whose figures are also transformers'
    # GlmMoeDsaConfig defaults (its docstring names zai-org/GLM-5) but rope_theta (1e6 in the file); every
    # layer runs its indexer (GLM-5.2 shares it: index_topk_freq 4, index_skip_topk_offset 3); the MTP layer
    # (layers.78) is not counted. 744B total, 40B active as published (the file's 753.9B counts the MTP layer)
    "glm-5": {"model_type": "glm_moe_dsa", "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288,
              "moe_intermediate_size": 2048, "num_hidden_layers": 78, "num_attention_heads": 64,
              "num_key_value_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
              "first_k_dense_replace": 3, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
              "norm_topk_prob": True, "routed_scaling_factor": 2.5, "q_lora_rank": 2048, "kv_lora_rank": 512,
              "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "index_n_heads": 32,
              "index_head_dim": 128, "index_topk": 2048, "indexer_rope_interleave": True, "rms_norm_eps": 1e-5,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000}, "max_position_embeddings": 202752,
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": [154820, 154827, 154829],
              "dtype": "bfloat16"},
    "olmoe-1b-7b": {"model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
                    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
                    "num_experts_per_tok": 8, "norm_topk_prob": False, "rms_norm_eps": 1e-5, "rope_theta": 10000,
                    "max_position_embeddings": 4096, "clip_qkv": None, "tie_word_embeddings": False,
                    "bos_token_id": None, "eos_token_id": 50279, "dtype": "bfloat16"},
    "gpt-oss-20b": {**_GPT_OSS, "num_hidden_layers": 24, "num_local_experts": 32,
                    "layer_types": ["sliding_attention", "full_attention"] * 12},
    "gpt-oss-120b": {**_GPT_OSS, "num_hidden_layers": 36, "num_local_experts": 128,
                     "layer_types": ["sliding_attention", "full_attention"] * 18},
    # MiniMax-M2 (also M2.1, M2.5: the same geometry): the published config.json's fields as third-party
    # fixtures quote them (found with the search tools; the file itself was not reachable), bos/eos from
    # transformers' MiniMaxM2Config defaults. The published weights are FP8; this is their bf16 shape.
    "minimax-m2": {"model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536,
                   "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
                   "rotary_dim": 64, "rope_theta": 5e6, "num_local_experts": 256, "num_experts_per_tok": 8,
                   "scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 196608, "tie_word_embeddings": False, "bos_token_id": 200034,
                   "eos_token_id": 200020, "dtype": "bfloat16"},
    "qwen3.6-35b-a3b": {**_QWEN35, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
                        "linear_num_value_heads": 32, "num_experts": 256, "num_experts_per_tok": 8,
                        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
    "qwen3.5-122b-a10b": {**_QWEN35, "hidden_size": 3072, "num_hidden_layers": 48, "num_attention_heads": 32,
                          "linear_num_value_heads": 64, "num_experts": 256, "num_experts_per_tok": 8,
                          "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024},
    "qwen3.5-397b-a17b": {**_QWEN35, "hidden_size": 4096, "num_hidden_layers": 60, "num_attention_heads": 32,
                          "linear_num_value_heads": 64, "num_experts": 512, "num_experts_per_tok": 10,
                          "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024},
    # Qwen3-Next-80B-A3B: transformers' Qwen3NextConfig defaults, which its docstring gives as this model's
    # (512 experts, top 10, 3 of 4 layers Gated DeltaNet), with the published file's context and RoPE base;
    # intermediate_size is unused (every layer is MoE)
    "qwen3-next-80b-a3b": {"model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120,
                           "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                           "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                           "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
                           "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
                           "shared_expert_intermediate_size": 512, "norm_topk_prob": True, "decoder_sparse_step": 1,
                           "mlp_only_layers": [], "rms_norm_eps": 1e-6, "max_position_embeddings": 262144,
                           "rope_theta": 10000000, "partial_rotary_factor": 0.25, "tie_word_embeddings": False,
                           "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16"},
    # Gemma 4 26B-A4B (google/gemma-4-26B-A4B-it): its config.json's text_config as third-party code quotes it
    # (found with the search tools; the file itself was not reachable); bos from transformers' Gemma4TextConfig
    "gemma-4-26b-a4b": {"model_type": "gemma4_text", "vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112,
                        "moe_intermediate_size": 704, "num_hidden_layers": 30, "num_attention_heads": 16,
                        "num_key_value_heads": 8, "num_global_key_value_heads": 2, "head_dim": 256, "global_head_dim": 512,
                        "attention_k_eq_v": True, "enable_moe_block": True, "num_experts": 128, "top_k_experts": 8,
                        "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 1024,
                        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5, "final_logit_softcapping": 30.0,
                        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                               "rope_theta": 1000000.0}},
                        "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
                        "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "tie_word_embeddings": True,
                        "bos_token_id": 2, "eos_token_id": [1, 106], "dtype": "bfloat16"},
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
        raw["first_k_dense_replace"] = min(raw.get("first_k_dense_replace", 0), n_layers - 1)
        if "layer_types" in raw:
            raw["layer_types"] = (raw["layer_types"] * n_layers)[:n_layers]
    return ModelConfig.from_hf(raw)

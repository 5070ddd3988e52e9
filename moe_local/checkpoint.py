"""Finding a model folder, validating its safetensors shards and reading tensors lazily by canonical name."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple
from pathlib import Path

import torch

from moe_local.config import FAMILIES, ModelConfig
from moe_local.errors import CheckpointError, ConfigError
from moe_local.weights import compressed, fp8, mxfp4
from moe_local.weights.compressed import PackedInt4
from moe_local.weights.fp8 import Fp8Blocks
from moe_local.weights.gguf import find_gguf
from moe_local.weights.rows import ba_rows, deinterleave_rope, qkvz_rows, ungate_rows

if TYPE_CHECKING:
    from moe_local.weights.gguf_model import GgufModel

# U8: MXFP4 blocks and scales (gpt-oss); F8_E4M3 with F32 or F8_E8M0 scales: FP8 blocks; I32 (I64): the
# packed int4 of compressed-tensors and its shapes; every other tensor we read must be one of the float types
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
                      "F8_E4M3": fp8.E4M3, "F8_E8M0": torch.float8_e8m0fnu, "I32": torch.int32, "I64": torch.int64}
# dtypes that only a quantized matrix's parts may have (each checked where its matrix is)
PART_DTYPES = (torch.float8_e8m0fnu, torch.int32, torch.int64)
# Buffers some older exports saved with the weights; they carry no information we need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(hf_home) / "hub"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A folder or a .gguf file as given, or a Hugging Face id (`org/name`) found offline in the hub cache."""
    path = Path(model).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the model's folder (the one with config.json) or a .gguf file")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        repo = hf_hub_cache() / f"models--{str(model).replace('/', '--')}"
        snapshots = repo / "snapshots"
        ref = repo / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        if snapshots.is_dir():
            candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
            if candidates:
                return candidates[-1]
        raise CheckpointError(
            f"model {model!r} is neither a folder nor in the Hugging Face cache ({hf_hub_cache()}); "
            "download it first (e.g. `hf download " + str(model) + "`) or give its folder"
        )
    raise CheckpointError(f"model path {path} does not exist")


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of the data in the file
    nbytes: int


def read_safetensors_header(shard: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header and check the file is as long as the header says."""
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(f"shard {shard.name} is corrupt or truncated: header runs past the end of the file")
            header = json.loads(f.read(header_len))
    except struct.error:
        raise CheckpointError(f"shard {shard.name} is truncated: {size} bytes, too short for a safetensors header") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"shard {shard.name} is corrupt: its safetensors header is not valid JSON") from None
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            shape = tuple(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {shard.name} is corrupt: bad header entry for {name}") from None
        if dtype is None:
            raise CheckpointError(f"tensor {name} in {shard.name} has dtype {entry['dtype']}; only F32, F16, BF16 (and U8 for MXFP4 experts, F8_E4M3 for FP8 blocks, I32 for packed int4) are supported")
        if end - begin != dtype.itemsize * int(torch.Size(shape).numel()):
            raise CheckpointError(f"shard {shard.name} is corrupt: {name}'s data offsets do not match its shape")
        tensors[name] = TensorInfo(shard, dtype, shape, 8 + header_len + begin, end - begin)
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(f"shard {shard.name} is truncated: expected {expected:,} bytes, found {size:,}")
    return tensors


class Target(NamedTuple):
    """Where a checkpoint tensor goes: our name (or ("expert", moe layer ordinal, expert, w) for a routed
    expert's matrix), its shape in the checkpoint, and a reordering applied after reading, if any. Several
    checkpoint tensors with one name of ours are concatenated along the first dimension, in order."""

    ours: str | tuple
    shape: tuple[int, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _linear(names: dict, hf: str, ours: str, shape: tuple[int, int], bias: bool = False, transform=None) -> None:
    names[hf + ".weight"] = Target(ours + ".weight", shape, transform)
    if bias:
        names[hf + ".bias"] = Target(ours + ".bias", shape[:1], transform)


def _mlp(names: dict, hf: str, ours: str, dim: int, hidden: int) -> None:
    """A resident SwiGLU MLP: gate_proj and up_proj fused into our w13, down_proj is w2."""
    _linear(names, hf + "gate_proj", ours + "w13", (hidden, dim))
    _linear(names, hf + "up_proj", ours + "w13", (hidden, dim))
    _linear(names, hf + "down_proj", ours + "w2", (dim, hidden))


def _attention(names: dict, cfg: ModelConfig, hf: str, ours: str, layer: int) -> None:
    d, h = cfg.dim, cfg.n_heads
    hd, hkv = cfg.layer_geometry(layer)
    if cfg.mla is not None:
        m = cfg.mla
        q_rows = deinterleave_rope(m.qk_dim, m.rope_dim) if cfg.rope.interleaved else None
        kv_rows = deinterleave_rope(m.kv_lora_rank + m.rope_dim, m.rope_dim) if cfg.rope.interleaved else None
        if m.q_lora_rank is None:
            _linear(names, hf + "q_proj", ours + "wq", (h * m.qk_dim, d), transform=q_rows)
        else:
            _linear(names, hf + "q_a_proj", ours + "wq.0", (m.q_lora_rank, d), cfg.qkv_bias)
            names[hf + "q_a_layernorm.weight"] = Target(ours + "wq.1.weight", (m.q_lora_rank,))
            _linear(names, hf + "q_b_proj", ours + "wq.2", (h * m.qk_dim, m.q_lora_rank), transform=q_rows)
        _linear(names, hf + "kv_a_proj_with_mqa", ours + "wkv_a", (m.kv_lora_rank + m.rope_dim, d), cfg.qkv_bias, kv_rows)
        names[hf + "kv_a_layernorm.weight"] = Target(ours + "kv_norm.weight", (m.kv_lora_rank,))
        _linear(names, hf + "kv_b_proj", ours + "wkv_b", (h * (m.nope_dim + m.v_dim), m.kv_lora_rank))
        _linear(names, hf + "o_proj", ours + "wo", (d, h * m.v_dim), cfg.o_bias)
        if (ix := cfg.indexer) is not None and ix.own(layer):
            # DeepSeek-V3.2's rotary (the first rope_dim of each head) is in halves already; GLM-5's pairs are
            # reordered like MLA's, in the query's and key's rows and in the key's LayerNorm, which follows wk
            rows = deinterleave_rope(ix.head_dim, ix.rope_dim, first=True) if ix.interleaved else None
            _linear(names, hf + "indexer.wq_b", ours + "indexer.wq", (ix.n_heads * ix.head_dim, m.q_lora_rank), transform=rows)
            _linear(names, hf + "indexer.wk", ours + "indexer.wk", (ix.head_dim, d), transform=rows)
            _linear(names, hf + "indexer.k_norm", ours + "indexer.k_norm", (ix.head_dim,), bias=True, transform=rows)
            _linear(names, hf + "indexer.weights_proj", ours + "indexer.weights", (ix.n_heads, d))
        return
    # q, k, v map to one matrix of ours (and one bias), concatenated in this order (no v where values are
    # keys: Gemma 4); a gated q projection (Qwen3-Next, Qwen3.5) holds each head's query and gate in turn
    # [H, 2, hd]: all queries, then all gates
    gate = ungate_rows(h, hd) if cfg.attn_gate else None
    _linear(names, hf + "q_proj", ours + "wqkv", (h * hd * (1 + cfg.attn_gate), d), cfg.qkv_bias, gate)
    _linear(names, hf + "k_proj", ours + "wqkv", (hkv * hd, d), cfg.qkv_bias)
    if not cfg.values_from_keys(layer):
        _linear(names, hf + "v_proj", ours + "wqkv", (hkv * hd, d), cfg.qkv_bias)
    _linear(names, hf + "o_proj", ours + "wo", (d, h * hd), cfg.o_bias)
    if cfg.attn_sinks:
        names[hf + "sinks"] = Target(ours + "sinks", (h,))
    if cfg.qk_norm:
        per_head = cfg.qk_norm == "head"
        names[hf + "q_norm.weight"] = Target(ours + "qk_norm.q_norm.weight", (hd if per_head else h * hd,))
        names[hf + "k_norm.weight"] = Target(ours + "qk_norm.k_norm.weight", (hd if per_head else hkv * hd,))


def _linear_attention(names: dict, cfg: ModelConfig, hf: str, ours: str, fused: bool) -> None:
    """A Gated DeltaNet layer: its input projections concatenated into our in_proj (q | k | v | z | b | a),
    from Qwen3.5's four (in_proj_qkv, _z, _b, _a) or Qwen3-Next's two fused ones (in_proj_qkvz, _ba: `fused`),
    the convolution's weights as [channels, kernel], and the rest as they are."""
    lin, d = cfg.linear, cfg.dim
    _linear_projections(names, cfg, hf, ours, fused)
    names[hf + "conv1d.weight"] = Target(ours + "conv", (lin.conv_dim, 1, lin.conv_kernel), lambda w: w[:, 0])
    names[hf + "A_log"] = Target(ours + "A_log", (lin.v_heads,))
    names[hf + "dt_bias"] = Target(ours + "dt_bias", (lin.v_heads,))
    names[hf + "norm.weight"] = Target(ours + "norm.weight", (lin.v_head_dim,))
    _linear(names, hf + "out_proj", ours + "out_proj", (d, lin.value_dim))


def _linear_projections(names: dict, cfg: ModelConfig, hf: str, ours: str, fused: bool) -> None:
    lin, d = cfg.linear, cfg.dim
    if fused:
        _linear(names, hf + "in_proj_qkvz", ours + "in_proj", (lin.conv_dim + lin.value_dim, d), transform=qkvz_rows(lin))
        _linear(names, hf + "in_proj_ba", ours + "in_proj", (2 * lin.v_heads, d), transform=ba_rows(lin))
        return
    _linear(names, hf + "in_proj_qkv", ours + "in_proj", (lin.conv_dim, d))
    _linear(names, hf + "in_proj_z", ours + "in_proj", (lin.value_dim, d))
    _linear(names, hf + "in_proj_b", ours + "in_proj", (lin.v_heads, d))
    _linear(names, hf + "in_proj_a", ours + "in_proj", (lin.v_heads, d))


def expected_tensors(cfg: ModelConfig, stacked_experts: bool = False) -> dict[str, Target]:
    """Checkpoint name -> `Target`, for every tensor config.json implies. `stacked_experts`: each MoE layer's
    routed experts as two [E, ...] tensors (the published Qwen3.5 files) rather than one tensor per expert
    and matrix."""
    family, d = FAMILIES[cfg.model_type], cfg.dim
    top = family.prefix
    names: dict[str, Target] = {
        top + "embed_tokens.weight": Target("tok_embeddings.weight", (cfg.vocab_size, d)),
        top + "norm.weight": Target("norm.weight", (d,)),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = Target("output.weight", (cfg.vocab_size, d))
    for i in range(cfg.n_layers):
        hf, ours = f"{top}layers.{i}.", f"layers.{i}."
        if i in cfg.linear_layers:
            _linear_attention(names, cfg, hf + "linear_attn.", ours + "attention.", family.fused_linear_projections)
        else:
            _attention(names, cfg, hf + "self_attn.", ours + "attention.", i)
        names[hf + "input_layernorm.weight"] = Target(ours + "attention_norm.weight", (d,))
        if cfg.sandwich_norms:
            _gemma4_layer(names, cfg, hf, ours, cfg.moe_layers.index(i))
            continue
        names[hf + "post_attention_layernorm.weight"] = Target(ours + "ffn_norm.weight", (d,))
        if i not in cfg.moe_layers:
            _mlp(names, hf + "mlp.", ours + "ffn.", d, cfg.dense_ffn_dim)
            continue
        moe, ordinal = f"{hf}{family.moe}.", cfg.moe_layers.index(i)
        names[f"{moe}{family.router}.weight"] = Target(ours + "ffn.router.weight", (cfg.n_experts, d))
        if cfg.router_bias:
            names[f"{moe}{family.router}.bias"] = Target(ours + "ffn.router.bias", (cfg.n_experts,))
        if cfg.router.correction_bias:
            names[moe + family.correction_bias] = Target(ours + "ffn.router.correction_bias", (cfg.n_experts,))
        if cfg.shared_ffn_dim:
            _mlp(names, f"{moe}{family.shared}.", ours + "ffn.shared.", d, cfg.shared_ffn_dim)
            if cfg.shared_gate:
                names[moe + "shared_expert_gate.weight"] = Target(ours + "ffn.shared_gate.weight", (1, d))
        if family.fused_experts:
            _fused_experts(names, cfg, f"{moe}experts.", ordinal)
            continue
        if stacked_experts:
            e, f = cfg.n_experts, cfg.ffn_dim
            names[f"{moe}experts.gate_up_proj"] = Target(("stacked", ordinal, "gate_up_proj"), (e, 2 * f, d))
            names[f"{moe}experts.down_proj"] = Target(("stacked", ordinal, "down_proj"), (e, d, f))
            continue
        for e in range(cfg.n_experts):
            for w, name in zip(("w1", "w2", "w3"), family.expert_weights):
                names[f"{moe}experts.{e}.{name}.weight"] = Target(("expert", ordinal, e, w), cfg.expert_shapes[w])
    return names


def _gemma4_layer(names: dict, cfg: ModelConfig, hf: str, ours: str, ordinal: int) -> None:
    """Gemma 4's layer beside its attention: the sandwich norms and scalar, the dense MLP between its norms
    (our shared expert), the router (its input scale, the experts' scales) and the fused experts with theirs."""
    d, e = cfg.dim, cfg.n_experts
    for hf_name, our_name, shape in (
        ("post_attention_layernorm.weight", "attention_out_norm.weight", (d,)), ("pre_feedforward_layernorm.weight", "ffn.shared.norm.weight", (d,)),
        ("post_feedforward_layernorm_1.weight", "ffn.shared.out_norm.weight", (d,)), ("pre_feedforward_layernorm_2.weight", "ffn.expert_norm.weight", (d,)),
        ("post_feedforward_layernorm_2.weight", "ffn.expert_out_norm.weight", (d,)), ("post_feedforward_layernorm.weight", "ffn_out_norm.weight", (d,)),
        ("layer_scalar", "rescale.weight", (1,)), ("router.proj.weight", "ffn.router.weight", (e, d)),
        ("router.scale", "ffn.router.input_scale", (d,)), ("router.per_expert_scale", "ffn.router.expert_scale", (e,)),
    ):  # fmt: skip
        names[hf + hf_name] = Target(ours + our_name, shape)
    _mlp(names, hf + "mlp.", ours + "ffn.shared.mlp.", d, cfg.shared_ffn_dim)
    _fused_experts(names, cfg, hf + "experts.", ordinal)


def _fused_experts(names: dict, cfg: ModelConfig, hf: str, ordinal: int) -> None:
    """gpt-oss: a layer's experts as one tensor per matrix, [E, D, 2F] gate_up (gate and up interleaved
    along the last dimension) and [E, F, D] down, with biases; or those matrices as MXFP4 blocks and
    scales in our [out, in] orientation ([E, 2F, D/32, 16], rows interleaved). Gemma 4 (`fused_layout`
    "halves"): [E, 2F, D] gate_up, gate rows then up rows, and [E, D, F] down, no biases. Read one expert at
    a time by `Checkpoint.expert`."""
    e, d, f, g = cfg.n_experts, cfg.dim, cfg.ffn_dim, mxfp4.BLOCK
    if FAMILIES[cfg.model_type].fused_layout == "halves":  # in our orientation, gate rows then up rows; no biases
        shapes = {"gate_up_proj": (e, 2 * f, d), "down_proj": (e, d, f)}
    elif cfg.mxfp4_experts:
        shapes = {"gate_up_proj_blocks": (e, 2 * f, d // g, g // 2), "gate_up_proj_scales": (e, 2 * f, d // g),
                  "down_proj_blocks": (e, d, f // g, g // 2), "down_proj_scales": (e, d, f // g)}
    else:
        shapes = {"gate_up_proj": (e, d, 2 * f), "down_proj": (e, f, d)}
    if cfg.expert_bias:
        shapes |= {"gate_up_proj_bias": (e, 2 * f), "down_proj_bias": (e, d)}
    for name, shape in shapes.items():
        names[hf + name] = Target(("fused", ordinal, name), shape)


def is_ignored(name: str, cfg: ModelConfig) -> bool:
    """Tensors we need not read: old exports' RoPE buffers, layers past num_hidden_layers (DeepSeek-V3's
    and GLM-4.5's multi-token-prediction layer, which transformers ignores too), and what the family's
    checkpoints hold beside the text model (vision towers, multi-token-prediction heads)."""
    family = FAMILIES[cfg.model_type]
    if name.endswith(IGNORED_SUFFIXES) or name.startswith(family.ignored):
        return True
    layer = re.match(re.escape(family.prefix) + r"layers\.(\d+)\.", name)
    return layer is not None and int(layer.group(1)) >= cfg.n_layers


class Checkpoint:
    """A validated model folder: config, tensor index, and tensors read one at a time when asked for."""

    def __init__(self, folder: Path):
        self.folder = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
        try:
            self.raw_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config_path} is not valid JSON: {e}") from None
        self.config = ModelConfig.from_hf(self.raw_config)
        self.tensors = self._index()
        self.stacked_experts = self._stacked_experts()
        self.expected = expected_tensors(self.config, self.stacked_experts)
        self.fp8_scales: dict[str, str] = {}  # an FP8 matrix's name -> its scales' (`weight_scale_inv`)
        self.packed: dict[str, str] = {}  # a compressed-tensors int4 matrix's name -> its parts' prefix
        self._check_against_config()
        self._expert_names = {t.ours[1:]: name for name, t in self.expected.items() if isinstance(t.ours, tuple)}
        self._last_fused: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None
        self.dtype = self.tensors[FAMILIES[self.config.model_type].prefix + "embed_tokens.weight"].dtype
        self._files: dict[Path, object] = {}

    def _stacked_experts(self) -> bool:
        """Whether the routed experts come as one [E, ...] tensor per matrix and layer (transformers' own
        parameters, as Qwen3.5's published files hold them) rather than per expert (as transformers saves them)."""
        cfg, family = self.config, FAMILIES[self.config.model_type]
        first = f"{family.prefix}layers.{cfg.moe_layers[0]}.{family.moe}.experts.gate_up_proj"
        return not family.fused_experts and first in self.tensors

    def _shards(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise CheckpointError(f"{index.name} is corrupt: no readable weight_map") from None
            shards = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            for shard in shards:
                if not shard.is_file():
                    raise CheckpointError(f"shard {shard.name} listed in {index.name} is missing from {self.folder}")
            return shards
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        raise CheckpointError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")

    def _index(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for shard in self._shards():
            tensors.update(read_safetensors_header(shard))
        return tensors

    def _check_against_config(self) -> None:
        """Every tensor config.json implies is there in its shape, as plain values or as a quantized matrix
        whose parts fit it (FP8 `weight` + `weight_scale_inv`, compressed-tensors `weight_packed`,
        `weight_scale`, `weight_shape`); which matrices are quantized is the checkpoint's to say, by the
        tensors it holds (`modules_to_not_convert` and `ignore` name the same ones). Fills `fp8_scales`
        and `packed`."""
        expected, quant, parts = self.expected, self.config.quantization, set()
        for name, (_, shape, _) in expected.items():
            info = self.tensors.get(name)
            prefix = name.removesuffix("weight")
            if info is None and name.endswith(".weight") and prefix + "weight_packed" in self.tensors:
                if not isinstance(quant, PackedInt4):
                    raise CheckpointError(f"the checkpoint has {prefix}weight_packed (compressed-tensors int4), "
                                          "but config.json's quantization_config does not describe it")  # fmt: skip
                found = {p: (self.tensors[prefix + p].shape, self.tensors[prefix + p].dtype) if prefix + p in self.tensors else None
                         for p in compressed.PARTS}  # fmt: skip
                quant.check(prefix, shape, found)
                self.packed[name] = prefix
                parts.update(prefix + p for p in compressed.PARTS)
                continue
            if info is None:
                raise CheckpointError(f"the checkpoint lacks tensor {name}, which config.json implies")
            if info.shape != shape:
                raise CheckpointError(
                    f"tensor {name} in {info.shard.name} has shape {list(info.shape)} "
                    f"but config.json implies {list(shape)}"
                )
            if info.dtype == fp8.E4M3:
                if not isinstance(quant, Fp8Blocks):
                    raise CheckpointError(f"tensor {name} is float8, but config.json has no fp8 quantization_config (weight_block_size)")
                scale = self.tensors.get(name + "_scale_inv")
                quant.check(name, shape, name + "_scale_inv", scale and scale.shape, scale and scale.dtype)
                self.fp8_scales[name] = name + "_scale_inv"
                parts.add(name + "_scale_inv")
                continue
            if (info.dtype == torch.uint8) != name.endswith(("_blocks", "_scales")) or info.dtype in PART_DTYPES:
                raise CheckpointError(f"tensor {name} in {info.shard.name} has dtype {info.dtype}, which it cannot have")
        for name in self.tensors:
            if name not in expected and name not in parts and not is_ignored(name, self.config):
                if name == "lm_head.weight":  # tied in config but saved anyway: harmless
                    continue
                raise CheckpointError(f"unknown tensor {name} in {self.tensors[name].shard.name} for model_type {self.config.model_type}")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor) with a plain file read at its header offset rather than
        through a memory map, so that what was read and dropped (an expert once packed into the store, the
        parts of a fused matrix) does not stay mapped into the process."""
        return self._read_bytes(self.tensors[name], name)

    def _read_bytes(self, info: TensorInfo, name: str) -> torch.Tensor:
        if info.shard not in self._files:
            self._files[info.shard] = open(info.shard, "rb", buffering=0)
        f = self._files[info.shard]
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        f.seek(info.start)
        if f.readinto(data.numpy()) != info.nbytes:
            raise CheckpointError(f"could not read {name} from {info.shard.name}: the file ends early")
        return data.view(info.dtype).view(info.shape)

    def resident_state_dict(self, dtype: torch.dtype, device: torch.device, host: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Every non-expert tensor under our names, converted and placed on `device` (those named in `host`
        in host RAM)."""
        pieces: dict[str, list[str]] = {}
        for name, target in self.expected.items():
            if isinstance(target.ours, str):
                pieces.setdefault(target.ours, []).append(name)
        state = {}
        for ours, names in pieces.items():
            tensors = [self._read(name, dtype) for name in names]
            where = "cpu" if ours in host else device
            state[ours] = (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).to(device=where, dtype=dtype)
        if self.config.tie_word_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` as values under our layout: a quantized matrix dequantized to `dtype` (others as stored)."""
        transform = self.expected[name].transform
        return self.values(name, dtype) if transform is None else transform(self.values(name, dtype))

    def values(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor `name` as values: an FP8 or packed int4 matrix dequantized to `dtype` by the reference
        (`moe_local/weights/`), one matrix at a time, so that a load's peak is as for a bf16 checkpoint;
        any other tensor as stored."""
        quant = self.config.quantization
        if name in self.fp8_scales:
            return fp8.dequantize(self.get(name), self.get(self.fp8_scales[name]), quant.block, dtype)
        if name in self.packed:
            prefix, shape = self.packed[name], self.expected[name].shape
            self._check_packed_shape(prefix, shape)
            return compressed.dequantize(self.get(prefix + "weight_packed"), self.get(prefix + "weight_scale"), shape, quant.group, dtype)
        return self.get(name)

    def _check_packed_shape(self, prefix: str, shape: tuple[int, int]) -> None:
        stored = tuple(self.get(prefix + "weight_shape").tolist())
        if stored != tuple(shape):
            raise CheckpointError(f"{prefix}weight_shape says {list(stored)}, but config.json implies {list(shape)}")

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """Row `index` of a tensor along its first dimension (one expert of a fused [E, ...] tensor), read alone."""
        info = self.tensors[name]
        row = info.nbytes // info.shape[0]
        return self._read_bytes(TensorInfo(info.shard, info.dtype, info.shape[1:], info.start + index * row, row), f"{name}[{index}]")

    def expert(self, layer: int, expert: int, w: str) -> torch.Tensor:
        """One routed expert's tensor: `layer` is the MoE layer's ordinal, w in ("w1", "w2", "w3") = gate
        [F, D], down [D, F], up [F, D], or their biases ("b1", "b2", "b3") where the family has them."""
        if (layer, expert, w) in self._expert_names:
            return self.values(self._expert_names[layer, expert, w])
        if w == "fp8":  # the published bytes, for the FP8 format to copy (KeyError: not FP8 here)
            return self._fp8_expert(layer, expert)
        if w == "int4":  # compressed-tensors' packed int4, for the int4 format to lay out (KeyError: none here)
            return self._packed_expert(layer, expert)
        if self.stacked_experts:  # gate and up come from one read
            if self._last_fused is None or self._last_fused[0] != (layer, expert):
                self._last_fused = (layer, expert), self._stacked_expert(layer, expert)
            return self._last_fused[1][w]
        if w == "mxfp4":  # the published bytes, for the MXFP4 format to copy (KeyError: none here)
            if not self.config.mxfp4_experts:
                raise KeyError(w)
            return self._mxfp4_expert(layer, expert)
        if self._last_fused is None or self._last_fused[0] != (layer, expert):  # gate and up come from one read
            self._last_fused = (layer, expert), self._fused_expert(layer, expert)
        return self._last_fused[1][w]

    def _fp8_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's FP8 parts in the `Fp8` format's layout: gate's rows then up's, each with its own blocks'
        scales (as fp32: UE8M0 scales exactly)."""
        names = [self._expert_names.get((layer, expert, w)) for w in ("w1", "w3", "w2")]
        if not all(name in self.fp8_scales for name in names):
            raise KeyError("fp8")
        (w1, s1), (w3, s3), (w2, s2) = ((self.get(n), self.get(self.fp8_scales[n]).float()) for n in names)
        return {"gate_up": torch.cat([w1, w3]), "gate_up.scale": torch.cat([s1, s3]), "down": w2, "down.scale": s2}

    def _packed_expert(self, layer: int, expert: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One expert's compressed-tensors int4 matrices: w -> (its stored nibbles, q + 8, uint8 [N, K]; its
        scales [N, K / group]), for w1, w2, w3."""
        names = {w: self._expert_names.get((layer, expert, w)) for w in ("w1", "w2", "w3")}
        if not all(name in self.packed for name in names.values()):
            raise KeyError("int4")
        parts = {}
        for w, name in names.items():
            prefix, shape = self.packed[name], self.expected[name].shape
            self._check_packed_shape(prefix, shape)
            parts[w] = compressed.unpack(self.get(prefix + "weight_packed"), shape[1]), self.get(prefix + "weight_scale")
        return parts

    def _stacked_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's matrices from a layer's stacked tensors: gate_up [E, 2F, D] (gate rows, then up
        rows), down [E, D, F]."""
        gate_up = self._fused_row(layer, "gate_up_proj", expert)  # [2F, D]
        w1, w3 = gate_up.chunk(2)
        return {"w1": w1.contiguous(), "w3": w3.contiguous(), "w2": self._fused_row(layer, "down_proj", expert)}

    def _mxfp4_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's MXFP4 parts in the `Mxfp4` format's layout: gate_up's rows (and bias) reordered from
        interleaved gate/up to gate rows then up rows; blocks and scales are per row, so this is exact."""
        def row(name: str) -> torch.Tensor:
            return self._fused_row(layer, name, expert)

        def halves(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[0::2], t[1::2]])

        return {
            "gate_up.blocks": halves(row("gate_up_proj_blocks")), "gate_up.scales": halves(row("gate_up_proj_scales")),
            "down.blocks": row("down_proj_blocks"), "down.scales": row("down_proj_scales"),
            "gate_up.bias": halves(row("gate_up_proj_bias")), "down.bias": row("down_proj_bias"),
        }

    def _fused_row(self, layer: int, name: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s row of MoE layer `layer`'s fused tensor `name` (gpt-oss: gate_up_proj_blocks, ...)."""
        return self.get_row(self._expert_names[layer, name], expert)

    def _fused_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        def row(name: str) -> torch.Tensor:
            return self._fused_row(layer, name, expert)

        if FAMILIES[self.config.model_type].fused_layout == "halves":
            gate_up = row("gate_up_proj")  # [2F, D]: gate rows, then up rows
            f = gate_up.shape[0] // 2
            return {"w1": gate_up[:f], "w3": gate_up[f:], "w2": row("down_proj")}
        if self.config.mxfp4_experts:  # widened exactly: every MXFP4 value is a bf16 value
            gate_up = mxfp4.dequantize(row("gate_up_proj_blocks"), row("gate_up_proj_scales"), self.dtype)  # [2F, D]
            down = mxfp4.dequantize(row("down_proj_blocks"), row("down_proj_scales"), self.dtype)  # [D, F]
        else:
            gate_up, down = row("gate_up_proj").T, row("down_proj").T  # [2F, D], [D, F]
        bias = row("gate_up_proj_bias")  # [2F]
        # gate and up are interleaved: even rows gate, odd rows up
        return {"w1": gate_up[0::2].contiguous(), "w3": gate_up[1::2].contiguous(), "w2": down.contiguous(),
                "b1": bias[0::2].contiguous(), "b3": bias[1::2].contiguous(), "b2": row("down_proj_bias")}

    def stored_as(self, name: str) -> str:
        """How matrix (or tensor) `name` is stored: "fp8 e4m3, 128 x 128 blocks, fp32 scales", "int4 ...", "bf16"."""
        quant = self.config.quantization
        if name in self.fp8_scales:
            dtype = self.tensors[self.fp8_scales[name]].dtype
            scales = "ue8m0" if dtype == torch.float8_e8m0fnu or quant.ue8m0 else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
            return f"fp8 e4m3, {quant.block[0]} x {quant.block[1]} blocks, {scales} scales"
        if name in self.packed:
            return f"int4 (compressed-tensors, symmetric, groups of {quant.group})"
        if name.endswith(("_blocks", "_scales")):
            return "mxfp4"
        return str(self.tensors[name].dtype).removeprefix("torch.")

    def formats(self) -> dict[str, list[str]]:
        """How the checkpoint stores each kind of tensor ("experts": the routed experts, "attention": the attention
        projections, "other": the rest), the formats found, each once."""
        kinds: dict[str, dict[str, None]] = {"experts": {}, "attention": {}, "other": {}}
        for name, target in self.expected.items():
            # attention: the projections of full and of linear attention (not their norms, convolution, decays)
            attention = isinstance(target.ours, str) and ".attention." in target.ours and len(target.shape) == 2
            kind = "experts" if isinstance(target.ours, tuple) else "attention" if attention else "other"
            kinds[kind][self.stored_as(name)] = None
        return {kind: list(found) for kind, found in kinds.items()}

    def expert_stored_bytes(self) -> int:
        """One routed expert's bytes in the checkpoint (its matrices' quantized parts included)."""
        names = [name for key, name in self._expert_names.items() if key[:2] == (0, 0)]
        parts = [[self.fp8_scales[n]] if n in self.fp8_scales else [self.packed[n] + p for p in compressed.PARTS] if n in self.packed else []
                 for n in names]  # fmt: skip
        return sum(self.tensors[n].nbytes for n in names if n in self.tensors) + sum(self.tensors[p].nbytes for ps in parts for p in ps)

    def close(self) -> None:
        """Close the files the reads opened (a later read opens them again)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def fingerprint(self) -> list[dict]:
        """Name, size and modification time of every file the weights and config come from: when one
        changes, what was derived from them (the quantized cache) is stale."""
        files = [self.folder / "config.json", *dict.fromkeys(info.shard for info in self.tensors.values())]
        return [{"file": f.name, "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def open_checkpoint(path: Path) -> Checkpoint | GgufModel:
    """The model at `path` (from `resolve_model_path`): a safetensors folder, or a GGUF file or folder of GGUF
    files (`weights.gguf_model.GgufModel`, which answers the same questions)."""
    files = find_gguf(path)
    if files:
        from moe_local.weights.gguf_model import GgufModel

        return GgufModel(files)
    return Checkpoint(path)

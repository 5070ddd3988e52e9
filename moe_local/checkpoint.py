"""Finding a model folder, validating its safetensors shards and reading tensors lazily by canonical name."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_local.config import ModelConfig
from moe_local.errors import CheckpointError, ConfigError

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
EXPERT_WEIGHTS = ("w1", "w2", "w3")  # gate [F, D], down [D, F], up [F, D]
# Buffers some older exports saved with the weights; they carry no information we need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(hf_home) / "hub"


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A folder as given, or a Hugging Face id (`org/name`) found offline in the hub cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the model's folder (the one with config.json)")
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
            "download it first (e.g. `huggingface-cli download " + str(model) + "`) or give its folder"
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
            raise CheckpointError(f"tensor {name} in {shard.name} has dtype {entry['dtype']}; only F32, F16, BF16 are supported")
        if end - begin != dtype.itemsize * int(torch.Size(shape).numel()):
            raise CheckpointError(f"shard {shard.name} is corrupt: {name}'s data offsets do not match its shape")
        tensors[name] = TensorInfo(shard, dtype, shape, 8 + header_len + begin, end - begin)
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(f"shard {shard.name} is truncated: expected {expected:,} bytes, found {size:,}")
    return tensors


def expert_tensor_name(layer: int, expert: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str | tuple, tuple[int, ...]]]:
    """Checkpoint name -> (our name, shape). Experts map to ("expert", layer, expert, w). Where several
    checkpoint tensors map to one name, ours is their concatenation along the first dimension, in order."""
    d, hd = cfg.dim, cfg.head_dim
    names: dict[str, tuple[str | tuple, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", (cfg.vocab_size, d)),
        "model.norm.weight": ("norm.weight", (d,)),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ("output.weight", (cfg.vocab_size, d))
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        # q, k, v map to one matrix of ours, concatenated in this order (see `resident_state_dict`)
        names[hf + "self_attn.q_proj.weight"] = (ours + "attention.wqkv.weight", (cfg.n_heads * hd, d))
        names[hf + "self_attn.k_proj.weight"] = (ours + "attention.wqkv.weight", (cfg.n_kv_heads * hd, d))
        names[hf + "self_attn.v_proj.weight"] = (ours + "attention.wqkv.weight", (cfg.n_kv_heads * hd, d))
        names[hf + "self_attn.o_proj.weight"] = (ours + "attention.wo.weight", (d, cfg.n_heads * hd))
        names[hf + "input_layernorm.weight"] = (ours + "attention_norm.weight", (d,))
        names[hf + "post_attention_layernorm.weight"] = (ours + "ffn_norm.weight", (d,))
        names[hf + "block_sparse_moe.gate.weight"] = (ours + "moe.gate.weight", (cfg.n_experts, d))
        for e in range(cfg.n_experts):
            for w in EXPERT_WEIGHTS:
                names[expert_tensor_name(i, e, w)] = (("expert", i, e, w), cfg.expert_shapes[w])
    return names


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
        self._check_against_config()
        self.dtype = self.tensors["model.embed_tokens.weight"].dtype
        self._files: dict[Path, object] = {}

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
        expected = expected_tensors(self.config)
        for name, (_, shape) in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"the checkpoint lacks tensor {name}, which config.json implies")
            if info.shape != shape:
                raise CheckpointError(
                    f"tensor {name} in {info.shard.name} has shape {list(info.shape)} "
                    f"but config.json implies {list(shape)}"
                )
        for name in self.tensors:
            if name not in expected and not name.endswith(IGNORED_SUFFIXES):
                if name == "lm_head.weight":  # tied in config but saved anyway: harmless
                    continue
                raise CheckpointError(f"unknown tensor {name} in {self.tensors[name].shard.name} for model_type {self.config.model_type}")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor) with a plain file read at its header offset rather than
        through a memory map, so that what was read and dropped (an expert once packed into the store, the
        parts of a fused matrix) does not stay mapped into the process."""
        info = self.tensors[name]
        if info.shard not in self._files:
            self._files[info.shard] = open(info.shard, "rb", buffering=0)
        f = self._files[info.shard]
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        f.seek(info.start)
        if f.readinto(data.numpy()) != info.nbytes:
            raise CheckpointError(f"could not read {name} from {info.shard.name}: the file ends early")
        return data.view(info.dtype).view(info.shape)

    def resident_state_dict(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Every non-expert tensor under our names, converted and placed on `device`."""
        pieces: dict[str, list[str]] = {}
        for name, (ours, _) in expected_tensors(self.config).items():
            if isinstance(ours, str):
                pieces.setdefault(ours, []).append(name)
        state = {}
        for ours, names in pieces.items():
            tensors = [self.get(name) for name in names]
            state[ours] = (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).to(device=device, dtype=dtype)
        if self.config.tie_word_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state

    def expert(self, layer: int, expert: int, w: str) -> torch.Tensor:
        """One expert matrix, w in ("w1", "w2", "w3")."""
        return self.get(expert_tensor_name(layer, expert, w))

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

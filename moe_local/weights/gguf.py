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

import gguf

from moe_local.errors import CheckpointError, ConfigError

SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# llama.cpp's architecture name -> transformers' model_type (what `FAMILIES` is keyed by), for MoE models
ARCHITECTURES = {"llama": "mixtral", "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "olmoe": "olmoe"}


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


def hf_config(metadata: dict, tensors: dict[str, GgufTensor]) -> dict:
    """The config.json fields `ModelConfig.from_hf` reads, from the GGUF's metadata (`{arch}.*`, `tokenizer.ggml.*`)
    and what the tensors show (a tied output, biases, a shared expert's gate)."""
    arch = metadata.get("general.architecture")
    model_type = ARCHITECTURES.get(arch)
    if model_type is None:
        raise ConfigError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ConfigError(f"the GGUF's metadata lacks {arch}.{key}")
        return value

    heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    n_experts = int(get("expert_count", 0))
    if n_experts == 0:
        raise ConfigError(f"this GGUF ({arch}) is a dense model with no routed experts; moe-local runs MoE models")
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ()) or tensors["token_embd.weight"].shape[0]
    raw = {
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": dim,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", dim // heads)),
        "num_experts_per_tok": int(get("expert_used_count")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "yarn":
        raw["rope_scaling"] = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor")),
                               "original_max_position_embeddings": int(get("rope.scaling.original_context_length"))}  # fmt: skip
    elif scaling != "none":
        raise ConfigError(f"unsupported RoPE scaling {scaling!r} in the GGUF's metadata (supported: none, yarn)")
    ffn = int(metadata.get(f"{arch}.expert_feed_forward_length") or get("feed_forward_length"))
    if model_type == "mixtral":
        raw |= {"num_local_experts": n_experts, "intermediate_size": ffn}
    elif model_type == "olmoe":
        clamp = metadata.get(f"{arch}.attention.clamp_kqv")
        raw |= {"num_experts": n_experts, "intermediate_size": ffn, "norm_topk_prob": False, "clip_qkv": clamp}
    else:
        # llama.cpp's qwen3moe renormalises the chosen weights, its qwen2moe does not (whatever the source said)
        raw |= {"num_experts": n_experts, "moe_intermediate_size": ffn, "norm_topk_prob": model_type == "qwen3_moe",
                "mlp_only_layers": [], "decoder_sparse_step": 1}  # fmt: skip
        if model_type == "qwen3_moe":
            raw["attention_bias"] = "blk.0.attn_q.bias" in tensors
        else:
            raw["qkv_bias"] = "blk.0.attn_q.bias" in tensors
            raw["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
    return raw

"""A GGUF model's tensors under our names (`GgufModel`, which stands where `checkpoint.Checkpoint` stands for a
safetensors folder): resident tensors dequantized (`ggml.py`), routed experts one at a time as the file's own
block bytes (`expert_blocks`) or dequantized (`expert`). Bytes are read with plain file reads at their offsets,
as `checkpoint.py` reads safetensors (no memory map of the weights).

llama.cpp's converter changes some layouts, undone here: the `llama` architecture's q and k rows are permuted
so that rotary pairs are adjacent (we rotate halves, as transformers does), and a layer's routed experts are
stacked into one tensor per matrix (`blk.N.ffn_{gate,up,down}_exps`, expert e's rows contiguous)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
import torch

from moe_local.config import ModelConfig
from moe_local.errors import CheckpointError
from moe_local.weights import ggml
from moe_local.weights.gguf import GgufTensor, hf_config, read_file


# ---- tensor names -----------------------------------------------------------------------------------------


def _rows_unpermuted(heads: int) -> callable:
    """Undo the `llama` converter's permutation of q or k rows (per head, halves -> adjacent rotary pairs)."""

    def transform(w: torch.Tensor) -> torch.Tensor:
        rest = w.shape[1:]
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)  # [H, 2, hd/2, ...]

    return transform


def resident_names(cfg: ModelConfig, arch: str) -> dict[str, list[tuple[str, tuple[int, ...], callable]]]:
    """Our name -> the GGUF tensors it is made of, in order (concatenated along the first dimension), each with
    its shape as we use it and a transform after dequantizing."""
    d, hd, h, hkv = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    permuted = arch == "llama"
    q_rows = _rows_unpermuted(h) if permuted else None
    k_rows = _rows_unpermuted(hkv) if permuted else None
    names = {"tok_embeddings.weight": [("token_embd.weight", (cfg.vocab_size, d), None)],
             "norm.weight": [("output_norm.weight", (d,), None)]}  # fmt: skip
    if not cfg.tie_word_embeddings:
        names["output.weight"] = [("output.weight", (cfg.vocab_size, d), None)]
    for i in range(cfg.n_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        a = ours + "attention."
        names[a + "wqkv.weight"] = [(blk + "attn_q.weight", (h * hd, d), q_rows), (blk + "attn_k.weight", (hkv * hd, d), k_rows),
                                    (blk + "attn_v.weight", (hkv * hd, d), None)]  # fmt: skip
        if cfg.qkv_bias:
            names[a + "wqkv.bias"] = [(blk + "attn_q.bias", (h * hd,), q_rows), (blk + "attn_k.bias", (hkv * hd,), k_rows),
                                      (blk + "attn_v.bias", (hkv * hd,), None)]  # fmt: skip
        names[a + "wo.weight"] = [(blk + "attn_output.weight", (d, h * hd), None)]
        if cfg.o_bias:
            names[a + "wo.bias"] = [(blk + "attn_output.bias", (d,), None)]
        if cfg.qk_norm:
            per_head = cfg.qk_norm == "head"
            names[a + "qk_norm.q_norm.weight"] = [(blk + "attn_q_norm.weight", (hd if per_head else h * hd,), None)]
            names[a + "qk_norm.k_norm.weight"] = [(blk + "attn_k_norm.weight", (hd if per_head else hkv * hd,), None)]
        names[ours + "attention_norm.weight"] = [(blk + "attn_norm.weight", (d,), None)]
        names[ours + "ffn_norm.weight"] = [(blk + "ffn_norm.weight", (d,), None)]
        names[ours + "ffn.router.weight"] = [(blk + "ffn_gate_inp.weight", (cfg.n_experts, d), None)]
        if cfg.shared_ffn_dim:
            s = cfg.shared_ffn_dim
            names[ours + "ffn.shared.w13.weight"] = [(blk + "ffn_gate_shexp.weight", (s, d), None), (blk + "ffn_up_shexp.weight", (s, d), None)]
            names[ours + "ffn.shared.w2.weight"] = [(blk + "ffn_down_shexp.weight", (d, s), None)]
            if cfg.shared_gate:
                names[ours + "ffn.shared_gate.weight"] = [(blk + "ffn_gate_inp_shexp.weight", (1, d), None)]
    return names


EXPERT_TENSORS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


class GgufModel:
    """A validated GGUF model (one file or split files): config, tensor index, tensors read when asked for.
    Stands where `checkpoint.Checkpoint` stands for a safetensors folder (`Engine.from_folder`)."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.folder = files[0].parent
        self.metadata, self.tensors = {}, {}
        for path in files:
            metadata, tensors = read_file(path)
            if not self.metadata:
                self.metadata = metadata
            self.tensors.update(tensors)
        self.arch = self.metadata.get("general.architecture")
        self.raw_config = hf_config(self.metadata, self.tensors)
        self.config = ModelConfig.from_hf(self.raw_config)
        self.expected = resident_names(self.config, self.arch)
        self._check()
        embed = self.tensors["token_embd.weight"].qtype
        self.dtype = ggml.FLOATS.get(embed, torch.bfloat16)  # the compute dtype by default: a float file's own, else bf16
        self._files: dict[Path, object] = {}

    def _check(self) -> None:
        cfg, known = self.config, set()
        for pieces in self.expected.values():
            for name, shape, _ in pieces:
                self._check_tensor(name, shape)
                known.add(name)
        for i in range(cfg.n_layers):
            for w, stem in EXPERT_TENSORS.items():
                name = f"blk.{i}.{stem}.weight"
                self._check_tensor(name, (cfg.n_experts, *cfg.expert_shapes[w]))
                known.add(name)
        for name in self.tensors:
            if name not in known and name != "rope_freqs.weight":
                raise CheckpointError(f"unknown tensor {name} in the GGUF for architecture {self.arch}")

    def _check_tensor(self, name: str, shape: tuple[int, ...]) -> None:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"the GGUF lacks tensor {name}, which its metadata implies")
        if info.shape != shape and not (len(shape) == 2 and shape[0] == 1 and info.shape == shape[1:]):
            raise CheckpointError(f"tensor {name} in {info.file.name} has shape {list(info.shape)} but the metadata implies {list(shape)}")

    # ---- reading ----

    def read_bytes(self, info: GgufTensor, start: int = 0, nbytes: int | None = None) -> torch.Tensor:
        """`nbytes` of `info`'s data from `start` (all of it by default), uint8, by a plain file read."""
        nbytes = info.nbytes - start if nbytes is None else nbytes
        if info.file not in self._files:
            self._files[info.file] = open(info.file, "rb", buffering=0)
        f = self._files[info.file]
        data = torch.empty(nbytes, dtype=torch.uint8)
        f.seek(info.start + start)
        if f.readinto(data.numpy()) != nbytes:
            raise CheckpointError(f"could not read {info.name} from {info.file.name}: the file ends early")
        return data

    def get(self, name: str) -> torch.Tensor:
        """A tensor dequantized to fp32, in its shape (torch's order)."""
        info = self.tensors[name]
        raw = self.read_bytes(info).view(-1, info.row_bytes)
        return ggml.dequantize(raw, info.qtype, info.shape[-1]).view(info.shape)

    def resident_state_dict(self, dtype: torch.dtype, device: torch.device, host: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Every non-expert tensor under our names, dequantized, converted to `dtype` and placed on `device` (those
        named in `host` in host RAM)."""
        state = {}
        for ours, pieces in self.expected.items():
            tensors = []
            for name, shape, transform in pieces:
                t = self.get(name).reshape(shape)
                tensors.append(t if transform is None else transform(t))
            where = "cpu" if ours in host else device
            state[ours] = (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).to(device=where, dtype=dtype)
        if self.config.tie_word_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state

    def expert_tensor(self, layer: int, w: str) -> GgufTensor:
        """MoE layer `layer`'s (ordinal) stacked tensor of matrix w ("w1" gate, "w2" down, "w3" up)."""
        return self.tensors[f"blk.{self.config.moe_layers[layer]}.{EXPERT_TENSORS[w]}.weight"]

    def expert_blocks(self, layer: int, expert: int, w: str) -> torch.Tensor:
        """One expert's matrix as the file holds it: uint8 [rows, row_bytes] in its ggml type."""
        info = self.expert_tensor(layer, w)
        rows = info.shape[1]
        return self.read_bytes(info, expert * rows * info.row_bytes, rows * info.row_bytes).view(rows, info.row_bytes)

    def expert(self, layer: int, expert: int, w: str) -> torch.Tensor | dict[str, torch.Tensor]:
        """One routed expert's matrix dequantized to fp32: w1 gate [F, D], w2 down [D, F], w3 up [F, D]; or for
        w="ggml" its block bytes as the `Ggml` format keeps them: gate then up rows, and down, with their two
        ggml type codes ("types": gate's, which up shares, and down's)."""
        if w == "ggml":
            gate, up, down = (self.expert_blocks(layer, expert, w) for w in ("w1", "w3", "w2"))
            types = torch.tensor([int(self.expert_tensor(layer, w).qtype) for w in ("w1", "w2")], dtype=torch.uint8)
            return {"gate_up": torch.cat([gate, up]), "down": down, "types": types}
        info = self.expert_tensor(layer, w)
        return ggml.dequantize(self.expert_blocks(layer, expert, w), info.qtype, info.shape[-1])

    def expert_types(self) -> dict[str, set[gguf.GGMLQuantizationType]]:
        """The ggml types the experts' matrices come in, per matrix ("w1", "w2", "w3"), over every MoE layer."""
        return {w: {self.expert_tensor(layer, w).qtype for layer in range(self.config.n_moe_layers)} for w in EXPERT_TENSORS}

    def layer_expert_types(self) -> list[dict[str, gguf.GGMLQuantizationType]]:
        """Each MoE layer's ggml types of its experts' matrices ("w1", "w2", "w3"): a file may mix them by layer."""
        return [{w: self.expert_tensor(layer, w).qtype for w in EXPERT_TENSORS} for layer in range(self.config.n_moe_layers)]

    def formats(self) -> dict[str, list[str]]:
        """The ggml types each kind of tensor comes in ("experts", "attention": the attention projections, "other")."""
        kinds: dict[str, dict[str, None]] = {"experts": {}, "attention": {}, "other": {}}
        for t in self.tensors.values():
            kind = "experts" if t.name.endswith("_exps.weight") else "attention" if ".attn_" in t.name and "norm" not in t.name else "other"
            kinds[kind][t.qtype.name] = None
        return {kind: sorted(found) for kind, found in kinds.items()}

    def bytes_by_type(self) -> dict[str, int]:
        """Bytes of tensor data per ggml type name (what `info` reports)."""
        sizes: dict[str, int] = {}
        for t in self.tensors.values():
            sizes[t.qtype.name] = sizes.get(t.qtype.name, 0) + t.nbytes
        return sizes

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def content_fingerprint(self) -> str:
        """A hash of what the experts are built from: every tensor's name, type, shape and place, and 16 blocks
        of 64 KiB sampled from each file's data (see `qcache.content_fingerprint` for safetensors)."""
        digest = hashlib.sha256()
        for t in sorted(self.tensors.values(), key=lambda t: t.name):
            digest.update(f"{t.name}\0{t.qtype.name}\0{t.shape}\0{t.file.name}\0{t.start}\0{t.nbytes}\0".encode())
        for path in self.files:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                for i in range(17):
                    f.seek(size * i // 17)
                    digest.update(f.read(1 << 16))
        return digest.hexdigest()

"""A GGUF model's tensors under our names (`GgufModel`, which stands where `checkpoint.Checkpoint` stands for a
safetensors folder): resident tensors dequantized (`ggml.py`), routed experts one at a time as the file's own
block bytes (`expert_blocks`) or dequantized (`expert`). Bytes are read with plain file reads at their offsets,
as `checkpoint.py` reads safetensors (no memory map of the weights).

llama.cpp's converter changes some layouts, undone here as each architecture's record (`gguf.ARCHITECTURES`)
says: the `llama` architecture's q and k rows are permuted so that rotary pairs are adjacent (we rotate halves,
as transformers does), Qwen3-Next's and Qwen3.5's zero-centred norms are stored as 1 + w and Qwen3.5's DeltaNet
value heads tiled, MLA's kv_b is split in two; and a layer's routed experts are stacked into one tensor per
matrix (`blk.N.ffn_{gate,up,down}_exps`, expert e's rows contiguous)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Callable

import gguf
import torch

from moe_local.config import FAMILIES, ModelConfig
from moe_local.errors import CheckpointError
from moe_local.weights import ggml
from moe_local.weights.gguf import Architecture, GgufTensor, architecture, hf_config, read_file
from moe_local.weights.rows import ba_rows, deinterleave_rope, ungate_rows


# ---- tensor names -----------------------------------------------------------------------------------------


def _rows_unpermuted(heads: int) -> Callable:
    """Undo the `llama` converter's permutation of q or k rows (per head, halves -> adjacent rotary pairs)."""

    def transform(w: torch.Tensor) -> torch.Tensor:
        rest = w.shape[1:]
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)  # [H, 2, hd/2, ...]

    return transform


def _minus_one(w: torch.Tensor) -> torch.Tensor:
    """A zero-centred norm's weight from the 1 + w the converter stored (our norms add the 1 back)."""
    return w - 1


def _v_heads_grouped(k_heads: int, v_heads: int, head_dim: int, dim: int = 0) -> Callable:
    """Undo Qwen3.5's converter reordering the DeltaNet's value heads from grouped by key head [Hk, g] to tiled
    [g, Hk] (rows of `head_dim` along `dim`)."""
    g = v_heads // k_heads

    def transform(w: torch.Tensor) -> torch.Tensor:
        w = w.movedim(dim, 0)
        w = w.reshape(g, k_heads, head_dim, *w.shape[1:]).transpose(0, 1).reshape(w.shape)  # [Hk, g, hd, ...]
        return w.movedim(0, dim).contiguous()

    return transform


def _qkv_v_grouped(lin) -> Callable:
    """The DeltaNet's q | k | v rows (or conv channels) with the v rows' heads grouped back by key head."""
    v_rows = _v_heads_grouped(lin.k_heads, lin.v_heads, lin.v_head_dim)
    qk = 2 * lin.k_heads * lin.k_head_dim

    def transform(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w[:qk], v_rows(w[qk:])])

    return transform


class Joined(list):
    """Pieces put together otherwise than end to end along the first dimension (`join`, on the transformed pieces)."""

    def __init__(self, pieces: list, join: Callable):
        super().__init__(pieces)
        self.join = join


Pieces = dict[str, list[tuple[str, tuple[int, ...], Callable | None]]]


def _latent_attention(names: Pieces, cfg: ModelConfig, blk: str, a: str) -> None:
    """MLA: llama.cpp splits kv_b per head into k_b [H, r, nope] (transposed) and v_b [H, v, r]; our wkv_b is
    [H (nope + v), r]. Rotary pairs stay interleaved in the file, as DeepSeek's own files have them."""
    m, d, h = cfg.mla, cfg.dim, cfg.n_heads
    q_rows = deinterleave_rope(m.qk_dim, m.rope_dim) if cfg.rope.interleaved else None
    kv_rows = deinterleave_rope(m.kv_lora_rank + m.rope_dim, m.rope_dim) if cfg.rope.interleaved else None
    if m.q_lora_rank is None:
        names[a + "wq.weight"] = [(blk + "attn_q.weight", (h * m.qk_dim, d), q_rows)]
    else:
        names[a + "wq.0.weight"] = [(blk + "attn_q_a.weight", (m.q_lora_rank, d), None)]
        names[a + "wq.1.weight"] = [(blk + "attn_q_a_norm.weight", (m.q_lora_rank,), None)]
        names[a + "wq.2.weight"] = [(blk + "attn_q_b.weight", (h * m.qk_dim, m.q_lora_rank), q_rows)]
    names[a + "wkv_a.weight"] = [(blk + "attn_kv_a_mqa.weight", (m.kv_lora_rank + m.rope_dim, d), kv_rows)]
    names[a + "kv_norm.weight"] = [(blk + "attn_kv_a_norm.weight", (m.kv_lora_rank,), None)]
    names[a + "wkv_b.weight"] = Joined([(blk + "attn_k_b.weight", (h, m.kv_lora_rank, m.nope_dim), lambda w: w.transpose(1, 2)),
                                        (blk + "attn_v_b.weight", (h, m.v_dim, m.kv_lora_rank), None)],
                                       lambda k, v: torch.cat([k, v], dim=1).reshape(-1, m.kv_lora_rank))  # [H, nope + v, r]  # fmt: skip
    names[a + "wo.weight"] = [(blk + "attn_output.weight", (d, h * m.v_dim), None)]


def _attention(names: Pieces, cfg: ModelConfig, record: Architecture, blk: str, a: str, layer: int) -> None:
    """GQA: q, k (v) rows into our wqkv, o; biases, sinks and q/k norms where the config has them."""
    d, h = cfg.dim, cfg.n_heads
    hd, hkv = cfg.layer_geometry(layer)
    q_rows = _rows_unpermuted(h) if record.permuted_qk else ungate_rows(h, hd) if cfg.attn_gate else None
    k_rows = _rows_unpermuted(hkv) if record.permuted_qk else None
    q = (blk + "attn_q", (h * hd * (1 + cfg.attn_gate),), q_rows)
    kv = [(blk + "attn_k", (hkv * hd,), k_rows), *([] if cfg.values_from_keys(layer) else [(blk + "attn_v", (hkv * hd,), None)])]
    names[a + "wqkv.weight"] = [(name + ".weight", (*rows, d), t) for name, rows, t in (q, *kv)]
    if cfg.qkv_bias:
        names[a + "wqkv.bias"] = [(name + ".bias", rows, t) for name, rows, t in (q, *kv)]
    names[a + "wo.weight"] = [(blk + "attn_output.weight", (d, h * hd), None)]
    if cfg.o_bias:
        names[a + "wo.bias"] = [(blk + "attn_output.bias", (d,), None)]
    if cfg.attn_sinks:
        names[a + "sinks"] = [(blk + "attn_sinks.weight", (h,), None)]
    if cfg.qk_norm:
        per_head, norm = cfg.qk_norm == "head", _minus_one if record.norm_plus_one else None
        names[a + "qk_norm.q_norm.weight"] = [(blk + "attn_q_norm.weight", (hd if per_head else h * hd,), norm)]
        names[a + "qk_norm.k_norm.weight"] = [(blk + "attn_k_norm.weight", (hd if per_head else hkv * hd,), norm)]


def _linear_attention(names: Pieces, cfg: ModelConfig, record: Architecture, blk: str, a: str) -> None:
    """A Gated DeltaNet layer: q | k | v (attn_qkv), z (attn_gate), b and a (ssm_beta, ssm_alpha: Qwen3.5; or
    ssm_ba, per key head: Qwen3-Next) into our in_proj; A from llama.cpp's -exp(A_log)."""
    lin, d = cfg.linear, cfg.dim
    tiled = record.tiled_v_heads
    v_heads = _v_heads_grouped(lin.k_heads, lin.v_heads, 1) if tiled else None
    in_proj = [(blk + "attn_qkv.weight", (lin.conv_dim, d), _qkv_v_grouped(lin) if tiled else None),
               (blk + "attn_gate.weight", (lin.value_dim, d), _v_heads_grouped(lin.k_heads, lin.v_heads, lin.v_head_dim) if tiled else None)]  # fmt: skip
    if FAMILIES[cfg.model_type].fused_linear_projections:  # Qwen3-Next's in_proj_ba, kept as it is
        in_proj.append((blk + "ssm_ba.weight", (2 * lin.v_heads, d), ba_rows(lin)))
    else:
        in_proj += [(blk + "ssm_beta.weight", (lin.v_heads, d), v_heads), (blk + "ssm_alpha.weight", (lin.v_heads, d), v_heads)]
    names[a + "in_proj.weight"] = in_proj
    names[a + "conv"] = [(blk + "ssm_conv1d.weight", (lin.conv_dim, lin.conv_kernel), _qkv_v_grouped(lin) if tiled else None)]
    a_log = (lambda w: torch.log(-w)) if v_heads is None else (lambda w: torch.log(-v_heads(w)))
    names[a + "A_log"] = [(blk + "ssm_a", (lin.v_heads,), a_log)]
    names[a + "dt_bias"] = [(blk + "ssm_dt.bias", (lin.v_heads,), v_heads)]
    names[a + "norm.weight"] = [(blk + "ssm_norm.weight", (lin.v_head_dim,), None)]
    out = _v_heads_grouped(lin.k_heads, lin.v_heads, lin.v_head_dim, dim=1) if tiled else None
    names[a + "out_proj.weight"] = [(blk + "ssm_out.weight", (d, lin.value_dim), out)]


def _mlp(names: Pieces, ours: str, blk: str, suffix: str, dim: int, hidden: int) -> None:
    """A resident SwiGLU MLP (dense layer or shared expert): gate and up rows into our w13, down is w2."""
    names[ours + "w13.weight"] = [(f"{blk}ffn_gate{suffix}.weight", (hidden, dim), None), (f"{blk}ffn_up{suffix}.weight", (hidden, dim), None)]
    names[ours + "w2.weight"] = [(f"{blk}ffn_down{suffix}.weight", (dim, hidden), None)]


def _gemma4_layer(names: Pieces, cfg: ModelConfig, blk: str, ours: str) -> None:
    """Gemma 4's layer beside its attention: the sandwich norms and scalar, the dense MLP between its norms (our
    shared expert), the router's input scale and the experts' scales (llama.cpp's scale of their down output,
    which is the same product)."""
    d, e = cfg.dim, cfg.n_experts
    for gguf_name, our_name, shape in (
        ("post_attention_norm.weight", "attention_out_norm.weight", (d,)), ("ffn_norm.weight", "ffn.shared.norm.weight", (d,)),
        ("post_ffw_norm_1.weight", "ffn.shared.out_norm.weight", (d,)), ("pre_ffw_norm_2.weight", "ffn.expert_norm.weight", (d,)),
        ("post_ffw_norm_2.weight", "ffn.expert_out_norm.weight", (d,)), ("post_ffw_norm.weight", "ffn_out_norm.weight", (d,)),
        ("layer_output_scale.weight", "rescale.weight", (1,)), ("ffn_gate_inp.weight", "ffn.router.weight", (e, d)),
        ("ffn_gate_inp.scale", "ffn.router.input_scale", (d,)), ("ffn_down_exps.scale", "ffn.router.expert_scale", (e,)),
    ):  # fmt: skip
        names[ours + our_name] = [(blk + gguf_name, shape, None)]
    _mlp(names, ours + "ffn.shared.mlp.", blk, "", d, cfg.shared_ffn_dim)


def resident_names(cfg: ModelConfig, record: Architecture) -> Pieces:
    """Our name -> the GGUF tensors it is made of, in order (concatenated along the first dimension), each with
    its shape as we use it and a transform after dequantizing; the pieces are chosen by the config, as the
    model's are, and the converter's layout changes by the architecture's record."""
    d = cfg.dim
    norm = _minus_one if record.norm_plus_one else None
    names: Pieces = {"tok_embeddings.weight": [("token_embd.weight", (cfg.vocab_size, d), None)],
                     "norm.weight": [("output_norm.weight", (d,), norm)]}  # fmt: skip
    if not cfg.tie_word_embeddings:
        names["output.weight"] = [("output.weight", (cfg.vocab_size, d), None)]
    for i in range(cfg.n_layers):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        if i in cfg.linear_layers:
            _linear_attention(names, cfg, record, blk, ours + "attention.")
        elif cfg.mla is not None:
            _latent_attention(names, cfg, blk, ours + "attention.")
        else:
            _attention(names, cfg, record, blk, ours + "attention.", i)
        names[ours + "attention_norm.weight"] = [(blk + "attn_norm.weight", (d,), norm)]
        if cfg.sandwich_norms:
            _gemma4_layer(names, cfg, blk, ours)
            continue
        names[ours + "ffn_norm.weight"] = [(f"{blk}{record.ffn_norm}.weight", (d,), norm)]
        if i not in cfg.moe_layers:
            _mlp(names, ours + "ffn.", blk, "", d, cfg.dense_ffn_dim)
            continue
        names[ours + "ffn.router.weight"] = [(blk + "ffn_gate_inp.weight", (cfg.n_experts, d), None)]
        if cfg.router_bias:
            names[ours + "ffn.router.bias"] = [(blk + "ffn_gate_inp.bias", (cfg.n_experts,), None)]
        if cfg.router.correction_bias:
            names[ours + "ffn.router.correction_bias"] = [(blk + "exp_probs_b.bias", (cfg.n_experts,), None)]
        if cfg.shared_ffn_dim:
            _mlp(names, ours + "ffn.shared.", blk, "_shexp", d, cfg.shared_ffn_dim)
            if cfg.shared_gate:
                names[ours + "ffn.shared_gate.weight"] = [(blk + "ffn_gate_inp_shexp.weight", (1, d), None)]
    return names


def mxfp4_parts(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's MXFP4 rows, uint8 [N, K/32 * 17] (each block an E8M0 scale byte, then 16 bytes: value j in the low
    nibble of byte j, value j + 16 in its high nibble) -> our MXFP4 blocks [N, K/32, 16] (values 2j and 2j + 1 in
    byte j's low and high nibbles) and scales [N, K/32]. ggml's values are twice the E2M1 codes' times half the
    scale, so codes and scale bytes carry over as they are."""
    blocks = raw.view(raw.shape[0], -1, 17)  # [N, G, 17]
    q = blocks[..., 1:]  # [N, G, 16]
    codes = torch.cat([q & 15, q >> 4], dim=-1)  # [N, G, 32]: value order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), blocks[..., 0].contiguous()


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
        self.record = architecture(self.metadata)
        self.expected = resident_names(self.config, self.record)
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
        for i in cfg.moe_layers:
            stems = dict(EXPERT_TENSORS)
            if self.record.fused_gate_up:
                f, d = cfg.expert_shapes["w1"]
                self._check_tensor(f"blk.{i}.ffn_gate_up_exps.weight", (cfg.n_experts, 2 * f, d))
                known.add(f"blk.{i}.ffn_gate_up_exps.weight")
                stems = {"w2": stems["w2"]}
            for w, stem in stems.items():
                self._check_tensor(f"blk.{i}.{stem}.weight", (cfg.n_experts, *cfg.expert_shapes[w]))
                known.add(f"blk.{i}.{stem}.weight")
                if cfg.expert_bias:
                    self._check_tensor(f"blk.{i}.{stem}.bias", (cfg.n_experts, cfg.expert_shapes[w][0]))
                    known.add(f"blk.{i}.{stem}.bias")
        for name in self.tensors:
            layer = re.match(r"blk\.(\d+)\.", name)
            if layer is not None and int(layer.group(1)) >= cfg.n_layers:  # a multi-token-prediction layer (GLM-4.5's nextn)
                continue
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
            joined = pieces.join(*tensors) if isinstance(pieces, Joined) else tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            state[ours] = joined.to(device=where, dtype=dtype)
        if self.config.tie_word_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state

    def expert_tensor(self, layer: int, w: str) -> GgufTensor:
        """MoE layer `layer`'s (ordinal) stacked tensor of matrix w ("w1" gate, "w2" down, "w3" up; gate and up are
        one tensor where the architecture fuses them)."""
        stem = "ffn_gate_up_exps" if self.record.fused_gate_up and w != "w2" else EXPERT_TENSORS[w]
        return self.tensors[f"blk.{self.config.moe_layers[layer]}.{stem}.weight"]

    def expert_blocks(self, layer: int, expert: int, w: str) -> torch.Tensor:
        """One expert's matrix as the file holds it: uint8 [rows, row_bytes] in its ggml type."""
        info = self.expert_tensor(layer, w)
        rows = self.config.expert_shapes[w][0]
        start = expert * info.shape[1] * info.row_bytes + (rows * info.row_bytes if w == "w3" and self.record.fused_gate_up else 0)
        return self.read_bytes(info, start, rows * info.row_bytes).view(rows, info.row_bytes)

    def expert(self, layer: int, expert: int, w: str) -> torch.Tensor | dict[str, torch.Tensor]:
        """One routed expert's matrix dequantized to fp32: w1 gate [F, D], w2 down [D, F], w3 up [F, D], their
        biases b1, b2, b3 where the family has them; or for w="ggml" its block bytes as the `Ggml` format keeps
        them: gate then up rows, and down, with their two ggml type codes ("types": gate's, which up shares, and
        down's)."""
        if w == "ggml":
            gate, up, down = (self.expert_blocks(layer, expert, w) for w in ("w1", "w3", "w2"))
            types = torch.tensor([int(self.expert_tensor(layer, w).qtype) for w in ("w1", "w2")], dtype=torch.uint8)
            return {"gate_up": torch.cat([gate, up]), "down": down, "types": types}
        if w in ("b1", "b2", "b3"):
            if not self.config.expert_bias:
                raise KeyError(w)
            info = self.tensors[f"blk.{self.config.moe_layers[layer]}.{EXPERT_TENSORS['w' + w[1]]}.bias"]
            row = self.read_bytes(info, expert * info.row_bytes, info.row_bytes).view(1, info.row_bytes)
            return ggml.dequantize(row, info.qtype, info.shape[-1])[0]
        if w == "mxfp4":
            return self._mxfp4_expert(layer, expert)
        if w not in EXPERT_TENSORS:  # another format's own bytes ("fp8", "int4"): not in this file
            raise KeyError(w)
        info = self.expert_tensor(layer, w)
        return ggml.dequantize(self.expert_blocks(layer, expert, w), info.qtype, info.shape[-1])

    def _mxfp4_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's MXFP4 matrices in the `Mxfp4` format's layout (gpt-oss's published one), from the file's
        ggml blocks: the same E2M1 codes and E8M0 scales, regrouped without loss (`mxfp4_parts`); and its biases."""
        if not self.config.mxfp4_experts:
            raise KeyError("mxfp4")
        parts = {}
        for name, ws in (("gate_up", ("w1", "w3")), ("down", ("w2",))):
            blocks, scales = mxfp4_parts(torch.cat([self.expert_blocks(layer, expert, w) for w in ws]))
            parts |= {f"{name}.blocks": blocks, f"{name}.scales": scales}
        return parts | {"gate_up.bias": torch.cat([self.expert(layer, expert, "b1"), self.expert(layer, expert, "b3")]),
                        "down.bias": self.expert(layer, expert, "b2")}  # fmt: skip

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

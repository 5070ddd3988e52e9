"""How one expert is laid out in its contiguous byte buffer, and how it runs: `Dense` (bf16/fp16/fp32),
`Int8` (per-output-channel scales), `Int4` (group-wise scales and zero points), `Mxfp4` (gpt-oss's) and `Fp8`
(e4m3 blocks, as the FP8 checkpoints publish them), weight-only.

Every format keeps an expert as one uint8 buffer of `expert_bytes` (weights and scales together, each
part aligned), so a cache miss stays one copy whichever the format. The int4 bit layout is the one the
device's kernel reads (`_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on the CPU), so a
quantized buffer belongs to one device type; `key` says which, and the quantized cache files by it.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass

import psutil
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moe_local import int4, int8, native
from moe_local.budget import format_bytes, snapshot_bytes, snapshots_tip
from moe_local.experts.mxfp4 import linear as mxfp4_linear
from moe_local.weights import ggml, mxfp4
from moe_local.config import ModelConfig
from moe_local.errors import BudgetError, CheckpointError, ConfigError
from moe_local.weights import fp8
from moe_local.weights.compressed import PackedInt4
from moe_local.weights.fp8 import Fp8Blocks

ALIGN = 256  # bytes: every part of an expert, and every expert, starts on this boundary
GROUPED_MAX_ROWS = 16  # rows an expert may take in one run of the int8 and int4 grouped kernels (bf16's take any number)
EXPERTS_DTYPES = ("auto", "bf16", "fp16", "fp32", "int8", "int4", "mxfp4", "fp8")
FP8_BLOCK = (128, 128)  # the blocks of fp8 experts quantized from other weights: the published checkpoints' size
GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels accept
DENSE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Weights = dict[str, torch.Tensor]  # a part's name -> a view into the expert's buffer


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Part:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


class ExpertFormat:
    """Base: a list of `Part`s (gate_up = w1 rows then w3 rows, [2F, D]; down = w2, [D, F]), `pack` to
    fill a buffer from the checkpoint's matrices, `forward` to run the expert from a buffer's views."""

    name: str
    quantized = False
    native = False  # the checkpoint's experts are already in this format: packing copies them, nothing to cache

    bias_dtype = torch.bfloat16  # where the family's experts have biases (gpt-oss), they are kept in this

    def __init__(self, cfg: ModelConfig, parts: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.cfg = cfg
        if cfg.expert_bias:
            parts = [*parts, ("gate_up.bias", self.bias_dtype, (2 * cfg.ffn_dim,)), ("down.bias", self.bias_dtype, (cfg.dim,))]
        self.activation = ACTIVATIONS[cfg.expert_act]
        self.parts, offset = [], 0
        for name, dtype, shape in parts:
            self.parts.append(Part(name, dtype, shape, offset))
            offset = aligned(offset + self.parts[-1].nbytes)
        self.expert_bytes = offset

    @property
    def key(self) -> str:
        """Names the byte layout: equal keys, interchangeable buffers."""
        return self.name

    def weights_bytes_per_param(self) -> float:
        return self.expert_bytes / self.cfg.expert_numel

    def unpack(self, buffer: torch.Tensor) -> Weights:
        """uint8 [expert_bytes] -> each part as a view of its dtype and shape."""
        return {p.name: buffer[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in self.parts}

    def pack(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, out: torch.Tensor, biases: tuple | None = None) -> None:
        """Write one expert (the checkpoint's w1 [F, D], w2 [D, F], w3 [F, D] and, for a family with expert
        biases, (b1 [F], b2 [D], b3 [F]); on any device, the work runs where they are) into `out`, a uint8
        [expert_bytes] buffer."""
        parts = self.encode(torch.cat([w1, w3]), "gate_up") | self.encode(w2, "down")
        if self.cfg.expert_bias:
            b1, b2, b3 = biases
            parts |= {"gate_up.bias": torch.cat([b1, b3]), "down.bias": b2}
        self.write(parts, out)

    def write(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Each named part into its place in `out`, a uint8 [expert_bytes] buffer."""
        views = self.unpack(out)
        for name, value in parts.items():
            views[name].copy_(value)

    def pack_native(self, read, out: torch.Tensor) -> bool:
        """Fill `out` from a source already in this format (`read(name)`), if the source has one."""
        return False

    def encode(self, w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, w: Weights) -> torch.Tensor:
        """The expert: x [N, D] -> [N, D], the family's activation between gate_up and down."""
        if not self.cfg.expert_bias:
            return self.linear(self.activation(self.linear(x, w, "gate_up"), self.cfg), w, "down")
        gate_up = self.linear(x, w, "gate_up") + w["gate_up.bias"].to(x.dtype)  # [N, 2F]
        return self.linear(self.activation(gate_up, self.cfg), w, "down") + w["down.bias"].to(x.dtype)

    def forward_grouped(self, xs: torch.Tensor, counts: list[int], weights: list[Weights]) -> torch.Tensor | None:
        """Several experts in one call on the CPU: xs [R, D] holds counts[i] rows for expert i (weights[i]), in
        that order -> [R, D], or None where the format has no such kernel (then each runs its `forward`)."""
        return None

    def blank(self, device: torch.device) -> Weights:
        """The views of an expert of zeros on `device` (what measuring the workspace runs)."""
        return self.unpack(torch.zeros(self.expert_bytes, dtype=torch.uint8, device=device))

    def cpu_unavailable(self) -> str | None:
        """Why these experts cannot run on the CPU from their host buffers (the CPU channel), or None."""
        return None

    def groups_slots(self, device: torch.device) -> bool:
        """Whether `forward_slots` runs a token's experts together on `device` (else one by one is better:
        the hits then run while the misses are still copying)."""
        return False

    def decode_table(self, views: list[Weights]) -> DecodeTable | None:
        """A layer's experts (`views`, by id, in host RAM) as one decode token's kernel call takes them, or None
        where the format has no such kernel (then `forward_grouped` or `forward` run them)."""
        return None

    def forward_slots(self, x: torch.Tensor, pool: torch.Tensor, slots: list[int], views: list[Weights]) -> torch.Tensor:
        """One token x [1, D] through the experts in `slots` of a slot pool (uint8 [S, expert_bytes], `views`
        its slots' parts) -> [len(slots), D], row i from expert slots[i], each the bits `forward` gives. Here
        one `forward` per expert; a format with a grouped kernel runs them all in one launch per matrix."""
        return torch.cat([self.forward(x, views[slot]) for slot in slots])

    def through_slots(self, x: torch.Tensor, pool: torch.Tensor, index: torch.Tensor, linear) -> torch.Tensor:
        """x [1, D] through the experts in slots `index` (int64 [G] on x's device) of `pool`, given `linear(xs, name,
        n)`: a grouped kernel's products of each slot's matrix `name` ([G or 1, K] -> [G, n]). gate_up, the
        activation, down, with each slot's biases gathered in one call each where the experts have them -> [G, D]."""
        part = {p.name: p for p in self.parts}

        def bias(name: str) -> torch.Tensor:  # each slot's bias, [G, n]
            p = part[name]
            return pool[:, p.offset : p.offset + p.nbytes].view(p.dtype).index_select(0, index).to(x.dtype)

        gate_up = linear(x, "gate_up", 2 * self.cfg.ffn_dim)  # [G, 2F]
        if self.cfg.expert_bias:
            gate_up = gate_up + bias("gate_up.bias")
        y = linear(self.activation(gate_up, self.cfg), "down", self.cfg.dim)  # [G, D]
        return y + bias("down.bias") if self.cfg.expert_bias else y


def swiglu(gate_up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # [N, F] each
    return F.silu(gate) * up


# the activations the grouped kernels take (`act` in cpu_kernels.c): SwiGLU's, and GeGLU's but not for fp8
KERNEL_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


def grouped_kernels(cfg: ModelConfig, kind: str, group: int = 0) -> ctypes.CDLL | None:
    """moe-local's kernels where their grouped SwiGLU (or GeGLU) kernel for `kind` takes `cfg`'s experts (no biases,
    SiLU or GELU's tanh form, sizes; the CPU's instructions for int8, int4 and a GGUF's blocks), else None."""
    act_taken = cfg.expert_act == "silu" or (cfg.expert_act == "gelu_tanh" and kind != "fp8")
    if (cfg.expert_bias or not act_taken or cfg.dim % 32 or cfg.ffn_dim % 32 or (kind == "int4" and (cfg.dim % 64 or cfg.ffn_dim % 64))
            or (kind == "fp8" and group % 16)
            or (kind == "int4-cuda" and (cfg.dim % 128 or cfg.ffn_dim % 128))):  # fmt: skip
        return None
    lib = native.library()
    if (isinstance(lib, str) or (kind in ("int8", "int4-cuda") and not lib.experts_int8) or (kind == "int4" and not lib.experts_int4)
            or (kind == "ggml" and not lib.experts_ggml_blocks)):  # fmt: skip
        return None
    return lib


class DecodeTable:
    """A layer's experts (`views`, by expert id) as `experts_decode` in `cpu_kernels.c` takes them: one call runs
    a decode step's tokens' k experts each by the grouped kernel (each expert once for all its tokens) and mixes
    their outputs as `runtime.weigh` does, with no Python per expert or token (`InPlaceExperts`, `--device cpu`):
    the same bits as `forward_grouped` then `weigh`, a token's the same in a batch as alone. Up to MAX_ROWS
    tokens (a decode or batch step's; a prefill's go through `runtime.mix`, whose sums run on torch's threads)."""

    MAX_ROWS = 32

    class _Struct(ctypes.Structure):  # `ExpertTable` in cpu_kernels.c
        _fields_ = [*((name, ctypes.c_int) for name in ("kind", "dim", "ffn_dim", "group", "experts")),
                    *((name, ctypes.c_void_p) for name in ("gate_up", "down", "gate_up_scale", "down_scale")), ("block_rows", ctypes.c_int),
                    ("act", ctypes.c_int), ("types", ctypes.c_void_p)]  # fmt: skip

    # each kind's parts beside gate_up and down: the two scales' and the ggml types'
    PARTS = {"bf16": (None, None, None), "int8": ("gate_up.scale", "down.scale", None), "int4": ("gate_up.scale_zero", "down.scale_zero", None),
             "fp8": ("gate_up.scale", "down.scale", None), "ggml": (None, None, "types")}  # fmt: skip

    def __init__(self, lib: ctypes.CDLL, cfg: ModelConfig, kind: str, group: int, views: list[Weights], block_rows: int = 0):
        def table(name: str | None):
            return None if name is None else (ctypes.c_void_p * len(views))(*(v[name].data_ptr() for v in views))

        self.lib, self.tables = lib, [table(name) for name in ("gate_up", "down", *self.PARTS[kind])]
        kinds = list(self.PARTS)
        pointers = [None if t is None else ctypes.addressof(t) for t in self.tables]
        self.struct = self._Struct(kinds.index(kind), cfg.dim, cfg.ffn_dim, group, len(views), *pointers[:4], block_rows,
                                   KERNEL_ACTIVATIONS[cfg.expert_act], pointers[4])  # fmt: skip

    @classmethod
    def build(cls, cfg: ModelConfig, kind: str, group: int, views: list[Weights], block_rows: int = 0) -> DecodeTable | None:
        lib = grouped_kernels(cfg, kind, group)
        return None if lib is None else cls(lib, cfg, kind, group, views, block_rows)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """x [T, D] bf16, weights [T, k] fp32, indices [T, k] -> the weighted sums [T, D] bf16; None for other dtypes
        or more than MAX_ROWS tokens."""
        if x.dtype != torch.bfloat16 or weights.dtype != torch.float32 or indices.dtype != torch.int64 or x.shape[0] > self.MAX_ROWS:
            return None
        x, weights, indices = x.contiguous(), weights.contiguous(), indices.contiguous()
        y = torch.empty_like(x)
        code = self.lib.experts_decode(ctypes.byref(self.struct), x.data_ptr(), x.shape[0], indices.data_ptr(), weights.data_ptr(),
                                       indices.shape[1], y.data_ptr(), torch.get_num_threads())  # fmt: skip
        native.check(code, "experts")
        return y


def swiglu_grouped(cfg: ModelConfig, xs: torch.Tensor, counts: list[int], weights: list[Weights], kind: str, group: int = 0,
                   block_rows: int = 0) -> torch.Tensor | None:  # fmt: skip
    """`forward_grouped` for SwiGLU (or GeGLU, not fp8) experts without biases whose weights are bf16, int8 with bf16 scales
    (`kind`; where the CPU has AVX512-VNNI) or int4 in groups of `group` (CPU layout; VNNI and VBMI): moe-local's CPU
    kernels (`native.py`), one call for a layer's experts instead of ~5 torch calls each (~50 us apiece for the demo
    model's small ones). bf16 experts take any number of rows: an expert's products of two rows or more widen each
    weight once for all of them (2.4-2.7x the runs of 16 below for a 512-token prompt's rows at Qwen3.6-35B-A3B's
    widths, docs/measurements.md), with the bits of one row at a time. int8 and int4 take up to `GROUPED_MAX_ROWS`
    rows a call's expert: an expert with more rows (a prefill's) is several of the call's experts with the same
    weights, each of up to that many rows: each row's sums are its own, so the bits do not depend on the split, and
    each weight read serves up to 16 rows, where torch's int4 kernel took 1.5-2.3x the time for an expert's 16 rows
    at Qwen3.6-35B-A3B's widths (a 512-token prompt routes ~16 rows to each of its 256 experts). Rounds where torch's
    bf16 path rounds; the order of the sums differs, int8 weights meet the activations as int16 (2^-15 of
    each row's largest value) and int4 weights as int8 (2^-8 of the largest of each 32). `int4-cuda`: int4
    in CUDA's layout, from host buffers (the CPU channel beside a GPU), any number of rows. `fp8`: e4m3 in blocks of
    `block_rows` x `group` with fp32 scales (`experts_swiglu_fp8`). None where it does not apply."""
    lib = grouped_kernels(cfg, kind, group)
    if lib is None or xs.dtype != torch.bfloat16 or xs.is_cuda:
        return None
    if kind not in ("int4-cuda", "bf16") and max(counts) > GROUPED_MAX_ROWS:  # an expert's rows in runs of up to GROUPED_MAX_ROWS
        runs = [(w, min(GROUPED_MAX_ROWS, c - start)) for w, c in zip(weights, counts) for start in range(0, c, GROUPED_MAX_ROWS)]
        weights, counts = [w for w, _ in runs], [rows for _, rows in runs]
    xs, n, act = xs.contiguous(), len(counts), KERNEL_ACTIVATIONS[cfg.expert_act]

    def pointers(name: str):
        return (ctypes.c_void_p * n)(*(w[name].data_ptr() for w in weights))

    starts = (ctypes.c_int * (n + 1))(0, *itertools.accumulate(counts))
    y = torch.empty(xs.shape, dtype=torch.float32)
    if kind == "fp8":
        code = lib.experts_swiglu_fp8(xs.data_ptr(), cfg.dim, cfg.ffn_dim, n, starts, pointers("gate_up"), pointers("down"), pointers("gate_up.scale"),
                                      pointers("down.scale"), block_rows, group, y.data_ptr(), torch.get_num_threads())  # fmt: skip
    elif kind in ("int4", "int4-cuda"):
        run = lib.experts_swiglu_int4 if kind == "int4" else lib.experts_swiglu_int4_tc
        code = run(xs.data_ptr(), cfg.dim, cfg.ffn_dim, n, starts, pointers("gate_up"), pointers("down"), pointers("gate_up.scale_zero"),
                   pointers("down.scale_zero"), group, y.data_ptr(), torch.get_num_threads(), act)  # fmt: skip
    else:
        scales = (pointers("gate_up.scale"), pointers("down.scale")) if kind == "int8" else (None, None)
        code = lib.experts_swiglu(xs.data_ptr(), cfg.dim, cfg.ffn_dim, n, starts, pointers("gate_up"), pointers("down"), *scales,
                                  y.data_ptr(), torch.get_num_threads(), act)  # fmt: skip
    native.check(code, "experts")
    return y.to(torch.bfloat16)


def swiglu_oai(gate_up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """gpt-oss's: gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha * gate). Its
    checkpoint interleaves gate and up columns; they are split into halves when packed."""
    gate, up = gate_up.chunk(2, dim=-1)  # [N, F] each
    gate = gate.clamp(max=cfg.swiglu_limit)
    up = up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
    return (up + 1) * (gate * torch.sigmoid(gate * cfg.swiglu_alpha))


def geglu_tanh(gate_up: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Gemma 4's: GELU's tanh approximation of the gate, times up (the grouped CPU kernels take it too, `act`)."""
    gate, up = gate_up.chunk(2, dim=-1)  # [N, F] each
    return F.gelu(gate, approximate="tanh") * up


ACTIVATIONS = {"silu": swiglu, "swiglu_oai": swiglu_oai, "gelu_tanh": geglu_tanh}


class Dense(ExpertFormat):
    """The matrices as they are, in one floating-point dtype."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        self.dtype = self.bias_dtype = dtype
        self.name = {v: k for k, v in DENSE.items()}[dtype]
        f, d = cfg.ffn_dim, cfg.dim
        super().__init__(cfg, [("gate_up", dtype, (2 * f, d)), ("down", dtype, (d, f))])

    def encode(self, w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        return {name: w}

    def linear(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        weight = w[name]
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))

    def forward_grouped(self, xs: torch.Tensor, counts: list[int], weights: list[Weights]) -> torch.Tensor | None:
        return swiglu_grouped(self.cfg, xs, counts, weights, "bf16") if self.dtype == torch.bfloat16 else None

    def decode_table(self, views: list[Weights]) -> DecodeTable | None:
        return DecodeTable.build(self.cfg, "bf16", 0, views) if self.dtype == torch.bfloat16 else None


class Int8(ExpertFormat):
    """int8 weights, one scale per output channel (symmetric: w ~ q * scale), run by
    `torch._weight_int8pack_mm` on the CPU and as a widened matmul on CUDA (see `moe_local/int8.py`);
    scales are kept in the compute dtype, as the kernel wants."""

    name = "int8"
    quantized = True

    def __init__(self, cfg: ModelConfig, compute_dtype: torch.dtype):
        self.scale_dtype = self.bias_dtype = compute_dtype
        f, d = cfg.ffn_dim, cfg.dim
        super().__init__(cfg, [
            ("gate_up", torch.int8, (2 * f, d)), ("gate_up.scale", compute_dtype, (2 * f,)),
            ("down", torch.int8, (d, f)), ("down.scale", compute_dtype, (d,)),
        ])  # fmt: skip

    @property
    def key(self) -> str:
        return f"int8-{Dense(self.cfg, self.scale_dtype).name}"

    def encode(self, w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        q, scale = int8.quantize(w, self.scale_dtype)
        return {name: q, f"{name}.scale": scale}

    def linear(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        return int8.linear(x, w[name], w[f"{name}.scale"])

    def forward_grouped(self, xs: torch.Tensor, counts: list[int], weights: list[Weights]) -> torch.Tensor | None:
        return swiglu_grouped(self.cfg, xs, counts, weights, "int8") if self.scale_dtype == torch.bfloat16 else None

    def decode_table(self, views: list[Weights]) -> DecodeTable | None:
        return DecodeTable.build(self.cfg, "int8", 0, views) if self.scale_dtype == torch.bfloat16 else None


class Int4(ExpertFormat):
    """4-bit weights in groups of `group_size` along the input dimension, each group with a scale and a
    zero point (w ~ (q - 8) * scale + zero, q in 0..15, torch's convention), bf16 scales. The weight bits
    are in the layout of the device's kernel: CUDA's tensor-core tiles or the CPU's packed rows."""

    name = "int4"
    quantized = True

    def __init__(self, cfg: ModelConfig, group_size: int, device_type: str):
        self.group_size, self.device_type = group_size, device_type
        self.native = isinstance(cfg.quantization, PackedInt4) and cfg.quantization.group == group_size
        f, d = cfg.ffn_dim, cfg.dim
        super().__init__(cfg, [
            ("gate_up", *self._weight_part(2 * f, d)), ("gate_up.scale_zero", torch.bfloat16, (d // group_size, 2 * f, 2)),
            ("down", *self._weight_part(d, f)), ("down.scale_zero", torch.bfloat16, (f // group_size, d, 2)),
        ])  # fmt: skip

    @property
    def key(self) -> str:
        return f"int4-g{self.group_size}-{self.device_type}"

    def _weight_part(self, n: int, k: int) -> tuple[torch.dtype, tuple[int, ...]]:
        if self.device_type == "cuda":
            t = int4.inner_k_tiles(k)
            return torch.int32, (n // 8, k // (t * 16), 32, t // 2)
        return torch.uint8, (n, k // 2)

    def encode(self, w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        packed, scale_zero = int4.quantize(w, self.group_size, self.device_type)
        return {name: packed, f"{name}.scale_zero": scale_zero}

    def pack_native(self, read, out: torch.Tensor) -> bool:
        """A checkpoint with compressed-tensors int4 experts in these groups (`Checkpoint.expert(..., "int4")`:
        w -> (nibbles q + 8, scales)) gives them laid out for the kernel as they are: a symmetric q * scale is
        torch's (nibble - 8) * scale + zero with zero 0, so with bf16 scales the values are the published ones."""
        if not self.native:  # other groups than the checkpoint's: quantized again from its values, as asked
            return False
        try:
            parts = read("int4")
        except KeyError:
            return False
        encoded = {}
        for name, ws in (("gate_up", ("w1", "w3")), ("down", ("w2",))):
            nibbles, scale = torch.cat([parts[w][0] for w in ws]), torch.cat([parts[w][1] for w in ws])
            if scale.dtype != torch.bfloat16 and not torch.equal(scale.to(torch.bfloat16).to(scale.dtype), scale):
                raise CheckpointError(f"the int4 experts' {scale.dtype} scales are not all bf16 values, and the int4 format keeps bf16 "
                                      "scales; load them with --experts-dtype bf16 (or int8)")  # fmt: skip
            scale = scale.to(torch.bfloat16)
            packed, scale_zero = int4.pack(nibbles.to(torch.int32), scale, torch.zeros_like(scale), self.device_type)
            encoded |= {name: packed, f"{name}.scale_zero": scale_zero}
        self.write(encoded, out)
        return True

    def linear(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        return int4.linear(x, w[name], w[f"{name}.scale_zero"], self.group_size, self.device_type)

    def forward_grouped(self, xs: torch.Tensor, counts: list[int], weights: list[Weights]) -> torch.Tensor | None:
        if self.device_type == "cpu":
            return swiglu_grouped(self.cfg, xs, counts, weights, "int4", self.group_size)
        # CUDA's layout, on the CPU: its kernel is the only way; it takes bf16, as tinygemm does on the GPU
        y = swiglu_grouped(self.cfg, xs.to(torch.bfloat16), counts, weights, "int4-cuda", self.group_size) if not xs.is_cuda else None
        return None if y is None else y.to(xs.dtype)

    def decode_table(self, views: list[Weights]) -> DecodeTable | None:
        return DecodeTable.build(self.cfg, "int4", self.group_size, views) if self.device_type == "cpu" else None

    def cpu_unavailable(self) -> str | None:
        if self.device_type == "cpu":
            return None
        why = native.unavailable()
        if why is None and not native.library().experts_int8:
            why = "it needs AVX512-VNNI"
        cfg = self.cfg
        if why is None and (cfg.expert_bias or cfg.expert_act not in KERNEL_ACTIVATIONS or cfg.dim % 128 or cfg.ffn_dim % 128):
            why = "it takes SwiGLU or GeGLU experts without biases whose hidden and FFN sizes are multiples of 128"
        return None if why is None else f"experts in {self.key} run on the CPU only through moe-local's kernel, and {why}"


class Mxfp4(ExpertFormat):
    """MXFP4 (gpt-oss's published format): E2M1 values, two per byte, one E8M0 scale per 32 along the input
    dimension, 4.25 bits a weight (`moe_local/weights/mxfp4.py` owns the numerics, `experts/mxfp4.py` the matmuls; on CUDA a Triton kernel
    for a few tokens, a widened matmul for prefill). The same bytes on every device. A checkpoint already in
    MXFP4 gives its published bytes, copied as they are (`pack_native`); other experts are quantized."""

    name = "mxfp4"
    quantized = True

    def __init__(self, cfg: ModelConfig):
        self.native = cfg.mxfp4_experts
        f, d = cfg.ffn_dim, cfg.dim
        g = mxfp4.BLOCK
        super().__init__(cfg, [
            ("gate_up.blocks", torch.uint8, (2 * f, d // g, g // 2)), ("gate_up.scales", torch.uint8, (2 * f, d // g)),
            ("down.blocks", torch.uint8, (d, f // g, g // 2)), ("down.scales", torch.uint8, (d, f // g)),
        ])  # fmt: skip

    def pack_native(self, read, out: torch.Tensor) -> bool:
        """A checkpoint in MXFP4 (`Checkpoint.expert(..., "mxfp4")`) gives its own bytes: copied as they are."""
        try:
            parts = read("mxfp4")
        except KeyError:
            return False
        self.write(parts, out)
        return True

    def encode(self, w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        blocks, scales = mxfp4.quantize(w)
        return {f"{name}.blocks": blocks, f"{name}.scales": scales}

    def linear(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        return mxfp4_linear(x, w[f"{name}.blocks"], w[f"{name}.scales"])

    def groups_slots(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def forward_slots(self, x: torch.Tensor, pool: torch.Tensor, slots: list[int], views: list[Weights]) -> torch.Tensor:
        """On CUDA, every expert of a decode token in one Triton launch per matrix (`mxfp4_triton.linear_grouped`:
        the same arithmetic as one expert's `linear`), and the biases gathered in one call each: ~10 launches
        a layer instead of ~12 per expert."""
        if not x.is_cuda:
            return super().forward_slots(x, pool, slots, views)
        from moe_local.experts import mxfp4_triton  # Triton is imported only where there is a GPU

        index = torch.tensor(slots, dtype=torch.int64, pin_memory=True).to(x.device, non_blocking=True)  # [G]
        flat, part = pool.view(-1), {p.name: p for p in self.parts}

        def linear(xs: torch.Tensor, name: str, n: int) -> torch.Tensor:
            blocks, scales = flat[part[f"{name}.blocks"].offset :], flat[part[f"{name}.scales"].offset :]
            return mxfp4_triton.linear_grouped(xs, blocks, scales, index, pool.stride(0), n)

        return self.through_slots(x, pool, index, linear)


class Fp8(ExpertFormat):
    """FP8 e4m3 weights with one fp32 scale per block of `block` (rows x columns) of each matrix, as DeepSeek-V3,
    Qwen3-FP8, GLM-4.5-FP8 and MiniMax-M2 publish their experts (`moe_local/weights/fp8.py` owns the numerics):
    a byte a weight, half of bf16's. A checkpoint whose experts are FP8 gives its published bytes, copied as
    they are (`pack_native`; UE8M0 scales become their fp32 values, exactly); other experts are quantized in
    blocks of FP8_BLOCK. On the CPU `experts_swiglu_fp8` (bf16 activations, up to 16 rows an expert; a decode
    token's experts by `DecodeTable`); on CUDA a decode token's experts in slots by one Triton launch per matrix
    (`forward_slots`; not yet run on a GPU); elsewhere (prefill, fp32, one expert at a time) each matrix
    dequantized to the activations' dtype, then one matmul."""

    name = "fp8"
    quantized = True

    def __init__(self, cfg: ModelConfig, block: tuple[int, int]):
        self.block = block
        self.native = isinstance(cfg.quantization, Fp8Blocks) and cfg.quantization.block == block
        f, d = cfg.ffn_dim, cfg.dim
        (gf, gd), (sd, sf) = fp8.Fp8Blocks(block).scale_shape((f, d)), fp8.Fp8Blocks(block).scale_shape((d, f))
        super().__init__(cfg, [
            ("gate_up", fp8.E4M3, (2 * f, d)), ("gate_up.scale", torch.float32, (2 * gf, gd)),  # gate's blocks, then up's
            ("down", fp8.E4M3, (d, f)), ("down.scale", torch.float32, (sd, sf)),
        ])  # fmt: skip

    @property
    def key(self) -> str:
        return f"fp8-b{self.block[0]}x{self.block[1]}"

    def pack_native(self, read, out: torch.Tensor) -> bool:
        """A checkpoint with FP8 experts in these blocks (`Checkpoint.expert(..., "fp8")`) gives its own bytes."""
        if not self.native:
            return False
        try:
            parts = read("fp8")
        except KeyError:
            return False
        self.write(parts, out)
        return True

    def pack(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, out: torch.Tensor, biases: tuple | None = None) -> None:
        (q1, s1), (q3, s3), (q2, s2) = (fp8.quantize(w, self.block) for w in (w1, w3, w2))  # gate and up in blocks of their own
        self.write({"gate_up": torch.cat([q1, q3]), "gate_up.scale": torch.cat([s1, s3]), "down": q2, "down.scale": s2}, out)

    def dequantize(self, w: Weights, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Matrix `name` of an expert's views as values [N, K] in `dtype` (gate_up: gate's rows, then up's)."""
        q, scale = w[name], w[f"{name}.scale"]
        if name == "down":
            return fp8.dequantize(q, scale, self.block, dtype)
        f, half = self.cfg.ffn_dim, scale.shape[0] // 2
        return torch.cat([fp8.dequantize(q[:f], scale[:half], self.block, dtype), fp8.dequantize(q[f:], scale[half:], self.block, dtype)])

    def linear(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        return F.linear(x, self.dequantize(w, name, x.dtype))

    def forward_grouped(self, xs: torch.Tensor, counts: list[int], weights: list[Weights]) -> torch.Tensor | None:
        return swiglu_grouped(self.cfg, xs, counts, weights, "fp8", self.block[1], self.block[0])

    def groups_slots(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def forward_slots(self, x: torch.Tensor, pool: torch.Tensor, slots: list[int], views: list[Weights]) -> torch.Tensor:
        """On CUDA, every expert of a decode token in one Triton launch per matrix (`fp8_triton.linear_grouped`:
        the e4m3 bytes widened in registers, each block's sum scaled), not yet measured on a GPU."""
        if not x.is_cuda:
            return super().forward_slots(x, pool, slots, views)
        from moe_local.experts import fp8_triton  # Triton is imported only where there is a GPU

        index = torch.tensor(slots, dtype=torch.int64, pin_memory=True).to(x.device, non_blocking=True)  # [G]
        flat, part = pool.view(-1), {p.name: p for p in self.parts}
        f, d = self.cfg.ffn_dim, self.cfg.dim

        def linear(xs: torch.Tensor, name: str, n: int, rows: int) -> torch.Tensor:
            weights, scales = flat[part[name].offset :], flat[part[f"{name}.scale"].offset :]
            return fp8_triton.linear_grouped(xs, weights, scales, index, pool.stride(0), n, rows, self.block)

        return linear(self.activation(linear(x, "gate_up", 2 * f, f), self.cfg), "down", d, d)  # [G, D]

    def decode_table(self, views: list[Weights]) -> DecodeTable | None:
        return DecodeTable.build(self.cfg, "fp8", self.block[1], views, self.block[0])


class Ggml(ExpertFormat):
    """A GGUF's experts in the file's own ggml blocks (Q8_0, Q4_0, Q5_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, IQ2_XXS or IQ3_XXS;
    `weights/ggml.py` owns the numerics), each MoE layer in its own types (`layer_types`: a Q4_K_M file keeps some
    layers' down in Q6_K, and where a width is not a whole number of K-quant blocks llama.cpp writes Q5_0 or Q8_0
    instead; Unsloth's dynamic quantizations mix more). An expert's buffer is self-describing: "types" holds its two ggml
    type codes (gate_up's, down's), "gate_up" the gate rows then the up rows [2F rows of D], "down" [D rows of F],
    each the file's bytes as they are (`pack_native`), at the start of a part sized for the widest type any
    layer uses (in a mixed file the narrower layers leave the rest unused: `padding_bytes`). Nothing is quantized
    or cached. On the CPU they run through `experts_ggml` of `cpu_kernels.c` with llama.cpp's arithmetic (each
    activation row rounded to Q8_0 blocks for Q8_0/Q4_0/Q5_0 weights, to Q8_K for the K-quants and IQ types, integer block products,
    the file's scales), for any number of rows and whichever experts run together (rows are independent: the
    same bits either way). On CUDA, Triton kernels read the blocks straight from the slots (`ggml_triton`, every
    type above; never run on a GPU yet, tested in Triton's interpreter): a decode token's experts in one launch
    per matrix (`forward_slots`), up to `CUDA_DECODE_MAX_ROWS` rows of one expert the same way, more rows a matrix
    widened in one launch then one matmul; exact arithmetic on the file's values up to fp32 sums (the activations
    are not rounded, where llama.cpp's CUDA kernels round them to Q8_1). On the CPU without the kernels, `linear`
    widens a matrix to the compute dtype in torch and runs one matmul (exact arithmetic on the file's values)."""

    quantized = True
    native = True
    TYPES = tuple(GGMLQuantizationType[name] for name in ("Q8_0", "Q4_0", "Q5_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ3_XXS"))
    CUDA_DECODE_MAX_ROWS = 8  # an expert's rows on CUDA that run in the decode kernel (it reads W once a row), as MXFP4's

    def __init__(self, cfg: ModelConfig, layer_types: list[tuple[GGMLQuantizationType, GGMLQuantizationType]]):
        self.layer_types = list(layer_types)  # per MoE layer: (gate_up's type, down's type)
        gate_up, down = ({t[i] for t in self.layer_types} for i in (0, 1))
        self.name = "gguf-" + "-".join(dict.fromkeys("+".join(t.name.lower() for t in sorted(types)) for types in (gate_up, down)))
        f, d = cfg.ffn_dim, cfg.dim
        self.sizes = [(2 * f * ggml.row_bytes(a, d), d * ggml.row_bytes(b, f)) for a, b in self.layer_types]  # per layer
        super().__init__(cfg, [("types", torch.uint8, (2,)), ("gate_up", torch.uint8, (max(s[0] for s in self.sizes),)),
                               ("down", torch.uint8, (max(s[1] for s in self.sizes),))])  # fmt: skip

    @property
    def padding_bytes(self) -> int:
        """Bytes of the store left unused: what each layer's experts take less than the widest layer's."""
        part = {p.name: p.nbytes for p in self.parts}
        return self.cfg.n_experts * sum(part["gate_up"] - a + part["down"] - b for a, b in self.sizes)

    def pack_native(self, read, out: torch.Tensor) -> bool:
        """A GGUF (`GgufModel.expert(..., "ggml")`) gives the expert's block bytes and types: copied as they are."""
        parts, views = read("ggml"), self.unpack(out)
        views["types"].copy_(parts["types"])
        for name in ("gate_up", "down"):
            data = parts[name].reshape(-1)
            views[name][: data.numel()].copy_(data)
        if self.cfg.expert_bias:  # gpt-oss's: b1 [F], b2 [D], b3 [F], as the file holds them (f32), in bias_dtype
            self.write({"gate_up.bias": torch.cat([read("b1"), read("b3")]), "down.bias": read("b2")}, out)
        return True

    def blank(self, device: torch.device) -> Weights:
        views = super().blank(device)
        views["types"].copy_(torch.tensor([int(t) for t in self.layer_types[0]], dtype=torch.uint8))
        return views

    def encode(self, w: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        raise ConfigError(f"{self.name} experts come only from a GGUF file in that type")

    def linear(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        if x.is_cuda:
            return self.linear_triton(x, w, name)
        qtype = GGMLQuantizationType(int(w["types"][0 if name == "gate_up" else 1]))
        rows, n = (2 * self.cfg.ffn_dim, self.cfg.dim) if name == "gate_up" else (self.cfg.dim, self.cfg.ffn_dim)
        blocks = w[name][: rows * ggml.row_bytes(qtype, n)].view(rows, -1)
        return F.linear(x, ggml.dequantize(blocks, qtype, n).to(x.dtype))

    def linear_triton(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        """`linear` by `ggml_triton` (on CUDA; on the CPU in Triton's interpreter): x [M, K] @ W.T -> [M, N] in x's
        dtype, the type read by the kernel from the expert's buffer: up to `CUDA_DECODE_MAX_ROWS` rows by the decode
        kernel, more by one matmul on the matrix widened to x's dtype."""
        from moe_local.experts import ggml_triton  # Triton is imported only where there is a GPU

        n, k = (2 * self.cfg.ffn_dim, self.cfg.dim) if name == "gate_up" else (self.cfg.dim, self.cfg.ffn_dim)
        types = w["types"][0 if name == "gate_up" else 1 :]
        if x.shape[0] > self.CUDA_DECODE_MAX_ROWS:
            return F.linear(x, ggml_triton.widen(w[name], types, n, k, x.dtype))
        same = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)  # every row reads the one matrix
        return ggml_triton.linear_grouped(x, w[name], types, same, 0, n)

    def groups_slots(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def forward_slots(self, x: torch.Tensor, pool: torch.Tensor, slots: list[int], views: list[Weights]) -> torch.Tensor:
        """On CUDA, every expert of a decode token in one Triton launch per matrix (`ggml_triton.linear_grouped`), the
        biases gathered in one call each; not yet run on a GPU."""
        if not x.is_cuda:
            return super().forward_slots(x, pool, slots, views)
        index = torch.tensor(slots, dtype=torch.int64, pin_memory=True).to(x.device, non_blocking=True)  # [G]
        return self.forward_slots_triton(x, pool, index)

    def forward_slots_triton(self, x: torch.Tensor, pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`forward_slots` by `ggml_triton` (on CUDA; on the CPU in Triton's interpreter): x [1, D], the slots'
        indices int64 [G] on x's device -> [G, D]."""
        from moe_local.experts import ggml_triton  # Triton is imported only where there is a GPU

        flat, part = pool.view(-1), {p.name: p for p in self.parts}

        def linear(xs: torch.Tensor, name: str, n: int) -> torch.Tensor:
            types = flat[part["types"].offset + (0 if name == "gate_up" else 1) :]
            return ggml_triton.linear_grouped(xs, flat[part[name].offset :], types, index, pool.stride(0), n)

        return self.through_slots(x, pool, index, linear)

    def forward(self, x: torch.Tensor, w: Weights) -> torch.Tensor:
        y = self.forward_grouped(x, [x.shape[0]], [w])
        return super().forward(x, w) if y is None else y

    def forward_grouped(self, xs: torch.Tensor, counts: list[int], weights: list[Weights]) -> torch.Tensor | None:
        lib = grouped_kernels(self.cfg, "ggml")
        if lib is None or xs.is_cuda:
            return None
        n = len(weights)
        starts = (ctypes.c_int * (n + 1))(0, *itertools.accumulate(counts))
        x = xs.float().contiguous()
        y = torch.empty(x.shape, dtype=torch.float32)
        gate_up, down, types = ((ctypes.c_void_p * n)(*(w[name].data_ptr() for w in weights)) for name in ("gate_up", "down", "types"))
        code = lib.experts_ggml(x.data_ptr(), self.cfg.dim, self.cfg.ffn_dim, n, starts, gate_up, down, types, y.data_ptr(), torch.get_num_threads(),
                                KERNEL_ACTIVATIONS[self.cfg.expert_act])  # fmt: skip
        native.check(code, "experts")
        return y.to(xs.dtype)

    def decode_table(self, views: list[Weights]) -> DecodeTable | None:
        return DecodeTable.build(self.cfg, "ggml", 0, views)


def gguf_format(layer_types: list[dict[str, GGMLQuantizationType]], cfg: ModelConfig, compute_dtype: torch.dtype,
                device_type: str) -> tuple[ExpertFormat, str]:  # fmt: skip
    """`auto` for a GGUF whose MoE layers' experts come in the ggml types `layer_types` (per MoE layer, per matrix
    w1/w2/w3): the file's own blocks where moe-local runs them (`Ggml`: each layer in its own types, gate and up
    in the same one, widths whole blocks), a float file's experts in the compute dtype, else the nearest format
    that runs (int8 for types of more than 4.5 bits a weight, int4 for the rest), converted once and cached, with
    a line saying so."""
    pairs = [(t["w1"], t["w2"]) for t in layer_types]
    every = {t for layer in layer_types for t in layer.values()}
    names = "/".join(sorted(t.name for t in every))

    def whole_blocks(t: GGMLQuantizationType, n: int) -> bool:
        return n % GGML_QUANT_SIZES[t][0] == 0

    if every <= set(Ggml.TYPES) and all(t["w1"] == t["w3"] and whole_blocks(t["w1"], cfg.dim) and whole_blocks(t["w2"], cfg.ffn_dim)
                                        for t in layer_types):  # fmt: skip
        fmt = Ggml(cfg, pairs)
        store = cfg.n_moe_layers * cfg.n_experts * fmt.expert_bytes
        mixed = (f", {len(set(pairs))} combinations over the layers; each expert's part is sized for the widest, "
                 f"{format_bytes(fmt.padding_bytes)} ({100 * fmt.padding_bytes / store:.1f}%) of the store unused") if len(set(pairs)) > 1 else ""
        return fmt, f"experts in {fmt.name} (auto: the file's own blocks{mixed})"
    if every == {GGMLQuantizationType.MXFP4} and cfg.mxfp4_experts:  # gpt-oss as published: our MXFP4 holds the same codes
        fmt = Mxfp4(cfg)
        return fmt, f"experts in {fmt.name} (auto: the file's MXFP4 blocks, regrouped into moe-local's layout without loss)"
    if every <= set(ggml.FLOATS):
        fmt = Dense(cfg, compute_dtype)
        return fmt, f"experts in {fmt.name} (auto: the file's {names} experts in the compute dtype)"
    bits = max(8 * size / values for values, size in (GGML_QUANT_SIZES[t] for t in every))
    target = "int8" if bits > 4.5 else "int4"
    fmt = make_format(target, cfg, compute_dtype, device_type, 32 if target == "int4" and cfg.dim % 32 == 0 and cfg.ffn_dim % 32 == 0 else None)
    return fmt, f"experts in {fmt.key} (auto: moe-local has no kernel for {names} yet, so the file's experts are converted once to the nearest format that runs, and cached)"


def default_group_size(cfg: ModelConfig) -> int:
    """128, or the largest smaller size that divides both matrix widths (hidden and expert FFN size)."""
    for g in (128, 64, 32):
        if cfg.dim % g == 0 and cfg.ffn_dim % g == 0:
            return g
    raise ConfigError(f"int4 needs the hidden size ({cfg.dim}) and the expert FFN size ({cfg.ffn_dim}) to be multiples of 32")


def make_format(
    name: str, cfg: ModelConfig, compute_dtype: torch.dtype, device_type: str, group_size: int | None = None
) -> ExpertFormat:
    """A concrete format ("auto" is resolved before, by `choose_format`)."""
    if name in DENSE:
        return Dense(cfg, DENSE[name])
    if name == "int8":
        return Int8(cfg, compute_dtype)
    if name == "mxfp4":
        if cfg.dim % mxfp4.BLOCK or cfg.ffn_dim % mxfp4.BLOCK:
            raise ConfigError(f"mxfp4 needs the hidden size ({cfg.dim}) and the expert FFN size ({cfg.ffn_dim}) to be multiples of 32")
        return Mxfp4(cfg)
    if name == "fp8":
        if cfg.expert_bias or cfg.expert_act != "silu":
            raise ConfigError("fp8 experts are SwiGLU experts without biases (this family's have biases or another activation)")
        return Fp8(cfg, cfg.quantization.block if isinstance(cfg.quantization, Fp8Blocks) else FP8_BLOCK)
    if name == "int4":
        if group_size is None:
            group_size = default_group_size(cfg)
        elif group_size not in GROUP_SIZES:
            raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size}")
        elif cfg.dim % group_size or cfg.ffn_dim % group_size:
            raise ConfigError(
                f"--group-size {group_size} does not divide the hidden size ({cfg.dim}) and the expert FFN size "
                f"({cfg.ffn_dim}); try {default_group_size(cfg)}"
            )
        if device_type == "cuda" and (cfg.dim % 32 or cfg.ffn_dim % 32 or cfg.dim % 8):
            raise ConfigError("int4 on CUDA needs the hidden and expert FFN sizes to be multiples of 32")
        return Int4(cfg, group_size, device_type)
    raise ConfigError(f"unknown experts dtype {name!r} (choose from {', '.join(EXPERTS_DTYPES)})")


AUTO_RAM_SHARE = 0.85  # `auto` picks the widest format whose experts fit in this share of the available RAM


def choose_format(
    name: str,
    cfg: ModelConfig,
    compute_dtype: torch.dtype,
    device_type: str,
    group_size: int | None,
    beside_bytes: int = 0,
    available: int | None = None,
    sequences: int = 1,
) -> tuple[ExpertFormat, str]:
    """The format `--experts-dtype name` asks for, with a line saying what was chosen and why. `auto`
    keeps the compute dtype when the experts (plus `beside_bytes` of other host memory, a hybrid's snapshots of
    `sequences` sequences among them) fit in 85% of the available RAM, else int8, else int4; a checkpoint's own
    formats first: MXFP4, compressed-tensors int4 (kept), FP8 (kept where it fits, else int4)."""
    if name != "auto":
        fmt = make_format(name, cfg, compute_dtype, device_type, group_size)
        return fmt, f"experts in {fmt.key} (--experts-dtype {name})"
    if cfg.mxfp4_experts:  # keep the published format: the smallest, and what the model was trained in
        fmt = make_format("mxfp4", cfg, compute_dtype, device_type)
        return fmt, "experts in mxfp4 (auto: the checkpoint's own format)"
    if isinstance(cfg.quantization, PackedInt4):  # the published int4 experts, exactly: no smaller format to fall to
        fmt = make_format("int4", cfg, compute_dtype, device_type, cfg.quantization.group)
        return fmt, f"experts in {fmt.key} (auto: the checkpoint's own compressed-tensors int4)"
    available = psutil.virtual_memory().available if available is None else available
    dense = {v: k for k, v in DENSE.items()}[compute_dtype]
    too_big = []
    # an FP8 checkpoint's experts stay FP8 (its own bytes, half of bf16's) where they fit, else int4
    candidates = ("fp8", "int4") if isinstance(cfg.quantization, Fp8Blocks) else (dense, "int8", "int4")
    for candidate in candidates:
        fmt = make_format(candidate, cfg, compute_dtype, device_type, group_size)
        experts = cfg.n_moe_layers * cfg.n_experts * fmt.expert_bytes
        need = experts + beside_bytes
        if need <= AUTO_RAM_SHARE * available:
            beside = f" + {format_bytes(beside_bytes)} beside them" if beside_bytes else ""
            why = f"{format_bytes(experts)} of experts{beside} in host RAM, {format_bytes(available)} available"
            if too_big:
                why = f"{'; '.join(too_big)}; {candidate} needs {why}"
            return fmt, f"experts in {fmt.key} (auto: {why})"
        too_big.append(f"{candidate} would need {format_bytes(need)}, over {AUTO_RAM_SHARE:.0%} of the {format_bytes(available)} available")
    snapshots = snapshot_bytes(cfg, compute_dtype, sequences)
    state = ["the snapshots of the linear-attention layers' state"] if snapshots else []
    if device_type == "cpu":
        what = f"the rest of the model, beside the experts on the CPU: {', '.join(['resident weights, KV cache, workspace', *state])}; `moe-local plan --device cpu` shows them"
    else:
        what = f"{' and '.join((['the token embeddings'] if beside_bytes > snapshots else []) + state)}, in host RAM beside a GPU"
    beside = f" ({format_bytes(beside_bytes)} of each is {what})" if beside_bytes else ""
    tip = snapshots_tip(snapshots, sequences, need, int(AUTO_RAM_SHARE * available))
    raise BudgetError(f"the experts do not fit in host RAM in any format: {'; '.join(too_big)}{beside}{tip}")

"""The recurrent core of a Gated DeltaNet layer's decode step on the CPU (Qwen3.5/3.6-MoE's and Qwen3-Next's linear
attention), through a kernel of our own (`deltanet_step` in `cpu_kernels.c`): the conv1d step over the conv state,
L2-normalised q and k, the decay and beta, the gated delta rule on the fp32 recurrent state and the gated RMSNorm,
for one token of each of a few sequences in one call, where the same steps as torch operations are ~30 operations
a layer (most of their time the interpreter's, the rest several passes over the state where the kernel makes one);
and a prompt's gated delta rule in chunks (`chunked`, `deltanet_chunked`), where `model.chunked_delta_rule`'s torch
operations spend most of their time copying and padding.

Where the kernels cannot be built, or the sizes are not the kernel's, the torch operations run (`build` and the
call return None)."""

from __future__ import annotations

import ctypes

import torch

from moe_local import native
from moe_local.cpu_attention import _Proj, _projection

MAX_ROWS = 16  # sequences one call takes (the server's batch), as `cpu_attention.MAX_ROWS`


class _Layer(ctypes.Structure):  # `DeltaNetLayer` in cpu_kernels.c
    _fields_ = [
        *((name, ctypes.c_int) for name in ("k_heads", "v_heads", "k_dim", "v_dim", "kernel", "state_len", "bf16")),
        ("eps", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("conv_weight", "neg_a", "dt_bias", "norm_weight")),
    ]  # fmt: skip


class _Block(ctypes.Structure):  # `DeltaNetBlock` in cpu_kernels.c
    _fields_ = [("core", _Layer), ("inp", _Proj), ("out", _Proj)]


class Step:
    """A Gated DeltaNet layer's decode step after its input projections and before its out_proj, in one kernel
    call: (qkv, z, b, a) of B sequences' tokens and their states -> the gated norm's output, the states updated
    in place. It rounds where transformers' torch operations round in bf16 (see the kernel's comment): the order
    of the sums differs, so outputs agree within bf16's rounding (fp32: within fp32's; the tests)."""

    def __init__(self, layer: _Layer, keep: list[torch.Tensor], dtype: torch.dtype):
        self.layer, self.keep, self.dtype = layer, keep, dtype  # keep: the tensors whose memory the struct points into

    @classmethod
    def build(cls, k_heads: int, v_heads: int, k_dim: int, v_dim: int, conv_weight, A_log, dt_bias, norm_weight, eps: float,
              state_len: int) -> Step | None:  # fmt: skip
        """For a layer of k_heads query/key heads of k_dim and v_heads value heads of v_dim, conv_weight [C, K]
        (C = 2 k_heads k_dim + v_heads v_dim; the activations' dtype, bf16 or fp32), A_log and dt_bias [v_heads],
        the gated norm's weight [v_dim] (the activations' dtype) and eps, conv states of state_len >= K - 1
        columns; None where the kernel does not apply (no kernels, another dtype, sizes it does not take)."""
        lib, dtype = native.library(), conv_weight.dtype
        C = 2 * k_heads * k_dim + v_heads * v_dim
        if (isinstance(lib, str) or dtype not in (torch.bfloat16, torch.float32) or norm_weight.dtype != dtype
                or conv_weight.dim() != 2 or conv_weight.shape[0] != C or state_len < conv_weight.shape[1] - 1 or state_len < 1
                or v_heads % k_heads or v_dim % 16 or v_dim > 1024 or k_dim > 1024):  # fmt: skip
            return None
        conv_weight, norm_weight = conv_weight.detach().contiguous(), norm_weight.detach().contiguous()
        neg_a = -A_log.detach().float().exp()  # as transformers: -A_log.float().exp() * softplus(a.float() + dt_bias)
        dt_bias = dt_bias.detach().float().contiguous()
        keep = [conv_weight, neg_a, dt_bias, norm_weight]
        layer = _Layer(k_heads, v_heads, k_dim, v_dim, conv_weight.shape[1], state_len, dtype == torch.bfloat16, eps,
                       *(t.data_ptr() for t in keep))  # fmt: skip
        return cls(layer, keep, dtype)

    def __call__(self, qkv, z, b, a, conv_states: list[torch.Tensor], states: list[torch.Tensor]) -> torch.Tensor | None:
        """qkv [B, C], z [B, v_heads v_dim], b and a [B, v_heads] (rows of the step's B tokens, each last dimension
        contiguous), conv_states[i] [C, state_len] and states[i] [v_heads, k_dim, v_dim] fp32 (contiguous: a
        sequence's own, or a pool's row) -> [B, v_heads v_dim] in the activations' dtype, the states updated in
        place; None where these are not the kernel's (then the torch operations run)."""
        L, B = self.layer, qkv.shape[0]
        C = 2 * L.k_heads * L.k_dim + L.v_heads * L.v_dim
        inputs = (qkv, z, b, a)
        widths = (C, L.v_heads * L.v_dim, L.v_heads, L.v_heads)
        if (not 0 < B <= MAX_ROWS or len(conv_states) != B or len(states) != B
                or any(t.dtype != self.dtype or t.dim() != 2 or t.shape != (B, w) or t.stride(1) != 1 for t, w in zip(inputs, widths))
                or any(t.dtype != self.dtype or t.shape != (C, L.state_len) or not t.is_contiguous() for t in conv_states)
                or any(t.dtype != torch.float32 or t.shape != (L.v_heads, L.k_dim, L.v_dim) or not t.is_contiguous() for t in states)):  # fmt: skip
            return None
        out = torch.empty(B, L.v_heads * L.v_dim, dtype=self.dtype)
        code = native.library().deltanet_step(
            ctypes.byref(L), B, (ctypes.c_void_p * 4)(*(t.data_ptr() for t in inputs)), (ctypes.c_long * 4)(*(t.stride(0) for t in inputs)),
            (ctypes.c_void_p * B)(*(t.data_ptr() for t in conv_states)), (ctypes.c_void_p * B)(*(t.data_ptr() for t in states)),
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        native.check(code, "Gated DeltaNet step")
        return out


class Fused:
    """A decode step's way through a layer's linear-attention block after its input norm, in one kernel call
    (`deltanet_block`): the input projection (q|k|v, z, b, a in one matrix; bf16, or `--resident-dtype` int8 or
    int4), `Step`'s core on each sequence's states in place, and out_proj, for one token of each of up to 16
    sequences, on the CPU in bf16. The projections round once, as torch's, so outputs agree with the torch
    operations within bf16's rounding (the order of the bf16 projections' sums differs; the tests)."""

    def __init__(self, block: _Block, keep: list, dim: int):
        self.block, self.keep, self.dim = block, keep, dim  # keep: what the struct points into (tensors, the core)

    @classmethod
    def build(cls, attention) -> Fused | None:
        """For `model.LinearAttention` `attention` (its conv states of K - 1 columns); None where the kernel does
        not apply: no kernels, not bf16, sizes or projections it does not take (then the torch operations run)."""
        lib = native.library()
        if isinstance(lib, str) or attention.conv.dtype != torch.bfloat16:
            return None
        core = Step.build(attention.k_heads, attention.v_heads, attention.k_dim, attention.v_dim, attention.conv, attention.A_log,
                          attention.dt_bias, attention.norm.weight, attention.norm.eps, attention.conv.shape[1] - 1)  # fmt: skip
        projections = [_projection(attention.in_proj, lib), _projection(attention.out_proj, lib)]
        if core is None or None in projections:
            return None
        (inp, _), (out, _) = projections
        if inp.n != sum(attention.split) or out.k != attention.v_heads * attention.v_dim or out.n != inp.k:
            return None
        return cls(_Block(core.layer, inp, out), [core, *(t for _, tensors in projections for t in tensors)], inp.k)

    def __call__(self, x: torch.Tensor, conv_states: list[torch.Tensor], states: list[torch.Tensor]) -> torch.Tensor | None:
        """x [B, D] bf16 (the input norm's output), conv_states[b] [C, K - 1] and states[b] [Hv, dk, dv] fp32 of
        sequence b (contiguous: its own or a pool's row), updated in place -> [B, D], what out_proj gives; None
        where these are not the kernel's (then the torch operations run)."""
        core, B = self.block.core, x.shape[0]
        C = 2 * core.k_heads * core.k_dim + core.v_heads * core.v_dim
        if (x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != self.dim or not x.is_contiguous() or not 0 < B <= MAX_ROWS
                or len(conv_states) != B or len(states) != B
                or any(t.dtype != torch.bfloat16 or t.shape != (C, core.state_len) or not t.is_contiguous() for t in conv_states)
                or any(t.dtype != torch.float32 or t.shape != (core.v_heads, core.k_dim, core.v_dim) or not t.is_contiguous() for t in states)):  # fmt: skip
            return None
        y = torch.empty_like(x)
        code = native.library().deltanet_block(
            ctypes.byref(self.block), B, x.data_ptr(), (ctypes.c_void_p * B)(*(t.data_ptr() for t in conv_states)),
            (ctypes.c_void_p * B)(*(t.data_ptr() for t in states)), y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        native.check(code, "Gated DeltaNet block")
        return y


def chunked(q, k, v, g, beta, state) -> torch.Tensor | None:
    """`model.chunked_delta_rule` (the same arguments: q, k [T, Hk, dk] and v [T, Hv, dv] in bf16 or fp32, any
    strides; g, beta [T, Hv]; state [Hv, dk, dv] fp32, updated in place) by the kernel -> y [T, Hv, dv] fp32; None
    where it does not apply (no kernels, not on the CPU, other dtypes, dk or dv not multiples of 16)."""
    lib = native.library()
    T, Hk, dk = q.shape
    Hv, dv = v.shape[1], v.shape[2]
    if (isinstance(lib, str) or q.dtype not in (torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype
            or k.shape != q.shape or v.shape[0] != T or g.shape != (T, Hv) or beta.shape != (T, Hv) or Hv % Hk or dk % 16 or dv % 16
            or state.dtype != torch.float32 or state.shape != (Hv, dk, dv) or not state.is_contiguous()
            or any(t.device.type != "cpu" for t in (q, k, v, g, beta, state))):  # fmt: skip
        return None
    g, beta = g.float().contiguous(), beta.float().contiguous()
    y = torch.empty(T, Hv, dv, dtype=torch.float32)

    def strides(t: torch.Tensor):
        return (ctypes.c_long * 3)(*t.stride())

    code = lib.deltanet_chunked(q.data_ptr(), strides(q), k.data_ptr(), strides(k), v.data_ptr(), strides(v), q.dtype == torch.bfloat16,
                                g.data_ptr(), beta.data_ptr(), T, Hk, Hv, dk, dv, state.data_ptr(), y.data_ptr(), torch.get_num_threads())  # fmt: skip
    native.check(code, "Gated DeltaNet chunked rule")
    return y

"""The recurrent core of a Gated DeltaNet layer's decode step on the CPU (Qwen3.5/3.6-MoE's and Qwen3-Next's linear
attention), through a kernel of our own (`deltanet_step` in `cpu_kernels.c`): the conv1d step over the conv state,
L2-normalised q and k, the decay and beta, the gated delta rule on the fp32 recurrent state and the gated RMSNorm,
for one token of each of a few sequences in one call, where the same steps as torch operations are ~30 operations
a layer (most of their time the interpreter's, the rest several passes over the state where the kernel makes one).

Where the kernels cannot be built, or the sizes are not the kernel's, the torch operations run (`build` and the
call return None)."""

from __future__ import annotations

import ctypes

import torch

from moe_local import native

MAX_ROWS = 16  # sequences one call takes (the server's batch), as `cpu_attention.MAX_ROWS`


class _Layer(ctypes.Structure):  # `DeltaNetLayer` in cpu_kernels.c
    _fields_ = [
        *((name, ctypes.c_int) for name in ("k_heads", "v_heads", "k_dim", "v_dim", "kernel", "state_len", "bf16")),
        ("eps", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("conv_weight", "neg_a", "dt_bias", "norm_weight")),
    ]  # fmt: skip


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

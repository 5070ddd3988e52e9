"""The attention of a decode step on the CPU, through a kernel of our own (`attend` in `cpu_kernels.c`).
torch's CPU SDPA is built for many queries; a decode step has a few per KV head (GQA's g, DeepSeek's H
over its one latent), and there it takes ~4x the time of reading the cache: 170 us for one layer of 8 KV
heads x 900 bf16 positions on 2 cores of the development machine, where the kernel takes ~100 (see
MAX_QUERIES).

The kernel is in `cpu_kernels.c`, built on first use (`native.py`); where it cannot be built, attention
stays on SDPA."""

from __future__ import annotations

import ctypes

import torch

from moe_local import native
from moe_local.int4 import Int4Linear
from moe_local.int8 import Int8Linear

# Queries per KV head up to which the kernel is the faster (its time grows with each query, SDPA's less),
# 900 bf16 positions, 2 threads, cache cold. Where bf16 keys are multiplied as bf16 pairs (AVX512-BF16): 8
# KV heads of 64, 8 queries 177 us against SDPA's 250, 16 281 against 346, 64 924 against 984; one latent of
# 576 (DeepSeek), 64 queries 722 against 1,306. Widening each key to fp32 first (fp32 caches, or CPUs without
# it): 4 queries 128 against 182, 8 194 against 223, 12 267 against 262; the latent, 32 567 against 623.
# A decode step's g (or DeepSeek's H) is within these; prefill chunks stay on SDPA.
MAX_QUERIES = {True: (32, 128), False: (8, 32)}  # bf16 pairs or not: (per KV head, over one latent of 256 or more)
MAX_ROWS = 16  # sequences `Fused` takes in one step (the server's batch), as the int8 and int4 projections' kernels


def attend(q, keys, values, mask, scale: float | None, sinks) -> torch.Tensor | None:
    """`model.attend` for a decode step on the CPU: q [B, Hkv, Q, D] over keys [B, Hkv, S, D] and values
    [B, Hkv, S, Dv] (views of caches or of a pool's rows: each row contiguous), mask [Q, S] (shared) or
    [B, 1, 1, S] (a pool's: each sequence's own) bool or None, sinks broadcastable to [B, Hkv, Q, 1] or None
    -> [B, Hkv, Q, Dv]; None where the kernel does not apply (then SDPA does it)."""
    if q.dtype not in (torch.bfloat16, torch.float32) or keys.dtype != q.dtype or values.dtype != q.dtype:
        return None
    if q.dim() != 4 or keys.shape[:2] != q.shape[:2] or values.shape[:3] != keys.shape[:3] or keys.shape[-1] != q.shape[-1]:
        return None
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or q.shape[-1] % 8 or values.shape[-1] % 8:
        return None
    batch, heads, queries, dim = q.shape
    positions, value_dim = keys.shape[2], values.shape[-1]
    k_head, v_head = _head_stride(keys), _head_stride(values)  # B x Hkv heads, one stride apart
    if k_head is None or v_head is None:
        return None
    if mask is None:
        mask_head = mask_query = 0
    elif mask.dtype == torch.bool and mask.shape == (queries, positions) and mask.is_contiguous():
        mask_head, mask_query = 0, positions
    elif mask.dtype == torch.bool and mask.shape == (batch, 1, 1, positions):
        mask = mask.expand(batch, heads, 1, positions).contiguous()  # each KV head its sequence's row
        mask_head, mask_query = positions, 0
    else:
        return None
    lib = native.library()
    if isinstance(lib, str) or queries > MAX_QUERIES[q.dtype == torch.bfloat16 and lib.bf16_pairs][dim >= 256]:
        return None
    q = q.contiguous()
    sinks = None if sinks is None else sinks.float().expand(batch, heads, queries, 1).reshape(batch * heads, queries).contiguous()
    out = torch.empty(batch, heads, queries, value_dim, dtype=q.dtype)
    code = lib.attend(
        q.data_ptr(), batch * heads, queries, dim, positions, keys.data_ptr(), k_head, keys.stride(2), values.data_ptr(),
        v_head, values.stride(2), value_dim, q.dtype == torch.bfloat16, dim**-0.5 if scale is None else scale,
        None if mask is None else mask.data_ptr(), mask_head, mask_query, None if sinks is None else sinks.data_ptr(),
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    native.check(code, "attention")
    return out


def _head_stride(t: torch.Tensor) -> int | None:
    """The stride between consecutive heads of t [B, Hkv, S, d] taken as B * Hkv heads, if there is one."""
    batch, heads = t.shape[:2]
    if heads == 1 or batch == 1:
        return t.stride(0) if heads == 1 else t.stride(1)
    return t.stride(1) if t.stride(0) == heads * t.stride(1) else None


class _Proj(ctypes.Structure):  # `Proj` in cpu_kernels.c
    _fields_ = [*((name, ctypes.c_void_p) for name in ("w", "scale", "bias")), *((name, ctypes.c_int) for name in ("n", "k", "group"))]


class _Layer(ctypes.Structure):  # `AttentionLayer` in cpu_kernels.c
    _fields_ = [
        *((name, ctypes.c_int) for name in ("dim", "heads", "kv_heads", "head_dim", "rot_dim", "qk_norm", "window", "v_norm", "values_from_keys")),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("attention_norm", "ffn_norm", "q_norm", "k_norm", "out_norm", "sinks")),
        ("qkv", _Proj), ("o", _Proj),
    ]  # fmt: skip


class Fused:
    """A decode step's way through a layer's resident attention block in one kernel call (`attention_step` in
    `cpu_kernels.c`): the attention norm, the q|k|v projection (bf16, or `--resident-dtype` int8 or int4), the
    q/k norms (and Gemma 4's v norm), rope, the cache write, attention, the output projection (and Gemma 4's norm
    after it), the residual sum and the MoE's norm where it has one, for one token (`Block.forward`) or one of each
    sequence of a batch step (`Block.forward_batch`), on the CPU in bf16, where the same steps as torch operations
    cost ~25 interpreter round trips a layer. It rounds where they do (see the kernel's comment); the order of the
    norms' sums and of the bf16 projections' differs, so logits agree within bf16's rounding (the tests)."""

    def __init__(self, layer: _Layer, keep: list[torch.Tensor]):
        self.layer, self.keep = layer, keep  # keep: the tensors whose memory the struct points into

    @classmethod
    def build(cls, attention_norm, attention, out_norm, ffn_norm, rot_dim: int) -> Fused | None:
        """For `model.Attention` `attention` between its block's norms (RMSNorm): before it, after its output
        projection (out_norm: Gemma 4's, or None) and before the MoE (ffn_norm, or None where the MoE takes x
        itself: Gemma 4), with rot_dim rotated dimensions a head; None where the kernel does not apply: no
        kernels, not bf16, clipped q/k/v, a gated attention or zero-centred norms (Qwen3-Next, Qwen3.5: the
        kernel computes neither), sizes it does not take, int8 or int4 projections on a CPU without their
        kernels, or more queries per KV head than `attend` takes (then the torch operations run, with the same
        results)."""
        lib = native.library()
        if isinstance(lib, str) or attention.clip is not None or attention.gated:
            return None
        H, Hkv, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
        D, qk = attention_norm.weight.shape[0], attention.qk_norm
        norms = [n for n in (attention_norm, ffn_norm, out_norm) if n is not None] + ([qk.q_norm, qk.k_norm] if qk is not None else [])
        projections = [_projection(attention.wqkv, lib), _projection(attention.wo, lib)]
        if (any(n.weight.dtype != torch.bfloat16 or n.eps != attention_norm.eps or n.offset for n in norms) or None in projections
                or (qk is not None and qk.v_norm and qk.eps != attention_norm.eps)
                or D % 32 or hd % 8 or (H * hd) % 32 or rot_dim % 2 or rot_dim > hd
                or H // Hkv > MAX_QUERIES[lib.bf16_pairs][hd >= 256]):  # fmt: skip
            return None
        sinks = None if attention.sinks is None else attention.sinks.detach().float().contiguous()
        keep = [n.weight for n in norms] + [t for _, t in projections for t in t] + ([sinks] if sinks is not None else [])
        (qkv, _), (o, _) = projections
        layer = _Layer(
            D, H, Hkv, hd, rot_dim, 0 if qk is None else 1 if qk.per_head else 2, attention.window or 0,
            int(qk is not None and qk.v_norm), int(attention.values_from_keys), attention_norm.eps,
            hd**-0.5 if attention.scale is None else attention.scale, _weight(attention_norm), _weight(ffn_norm),
            _weight(None if qk is None else qk.q_norm), _weight(None if qk is None else qk.k_norm), _weight(out_norm),
            None if sinks is None else sinks.data_ptr(), qkv, o,
        )  # fmt: skip
        return cls(layer, keep)

    def __call__(self, x, cos, sin, caches: list[tuple[torch.Tensor, ...]], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [B, D] bf16: one token of each of B sequences, row b at positions[b] of caches[b] (keys and values
        [Hkv, C, hd], as `KVCache` rows hold them); cos and sin [B, rot_dim] -> (x after the attention block,
        the MoE's input: the same tensor where the block has no ffn_norm), or None where these are not the
        kernel's (then the torch operations run). The projections read their weights once for the B rows."""
        keys = caches[0][0]
        if (len(caches) != x.shape[0] or len(positions) != x.shape[0] or x.dtype != torch.bfloat16 or keys.dtype != torch.bfloat16 or not 0 < x.shape[0] <= MAX_ROWS or cos.shape != (x.shape[0], self.layer.rot_dim)
                or not x.is_contiguous() or not cos.is_contiguous() or not sin.is_contiguous()
                or any(t.stride() != keys.stride() or t.shape != keys.shape for cache in caches for t in cache)
                or keys.stride()[1:] != (self.layer.head_dim, 1)):  # fmt: skip
            return None
        B = x.shape[0]
        x_out = torch.empty_like(x)
        h = x_out if self.layer.ffn_norm is None else torch.empty_like(x)
        code = native.library().attention_step(
            ctypes.byref(self.layer), B, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), (ctypes.c_void_p * B)(*(k.data_ptr() for k, _ in caches)),
            (ctypes.c_void_p * B)(*(v.data_ptr() for _, v in caches)), keys.stride(0), keys.shape[1], (ctypes.c_int * B)(*positions),
            x_out.data_ptr(), h.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        native.check(code, "attention step")
        return x_out, h


def _weight(norm) -> int | None:
    """A norm's weight as the kernel's pointer, or NULL for no norm."""
    return None if norm is None else norm.weight.data_ptr()


def _projection(linear, lib) -> tuple[_Proj, list[torch.Tensor]] | None:
    """A bf16 `nn.Linear`, an `Int8Linear` with bf16 scales or an `Int4Linear` in the CPU's layout as the kernel's
    `Proj`, with the tensors it points into; None for anything else, sizes it does not take, or int8 and int4
    where the CPU lacks their kernels (AVX512-VNNI; and VBMI)."""
    bias, group = linear.bias, 0
    if bias is not None and bias.dtype != torch.bfloat16:
        return None
    if isinstance(linear, Int4Linear):
        n, k = linear.out_features, linear.in_features
        if not lib.experts_int4 or linear.layout != "cpu" or n % 64 or k % linear.group:
            return None
        tensors, group = [linear.weight, linear.scale_zero], linear.group
    elif isinstance(linear, Int8Linear):
        (n, k) = linear.weight.shape
        if not lib.experts_int8 or linear.scale.dtype != torch.bfloat16 or k % 32 or n % 8:
            return None
        tensors = [linear.weight, linear.scale]
    elif linear.weight.dtype == torch.bfloat16 and linear.weight.shape[0] % 8 == 0 and linear.weight.shape[1] % 32 == 0:
        (n, k), tensors = linear.weight.shape, [linear.weight.detach()]
    else:
        return None
    if any(not t.is_contiguous() for t in tensors):
        return None
    w, scale = tensors[0].data_ptr(), tensors[1].data_ptr() if len(tensors) == 2 else None
    tensors += [bias.detach()] if bias is not None else []
    return _Proj(w, scale, None if bias is None else bias.data_ptr(), n, k, group), tensors

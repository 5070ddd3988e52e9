"""The attention of a decode step on the CPU, through a kernel of our own (`attend` in `cpu_kernels.c`).
torch's CPU SDPA is built for many queries; a decode step has a few per KV head (GQA's g, DeepSeek's H
over its one latent), and there it takes ~4x the time of reading the cache: 170 us for one layer of 8 KV
heads x 900 bf16 positions on 2 cores of the development machine, where the kernel takes ~100 (see
MAX_QUERIES).

The kernel is in `cpu_kernels.c`, built on first use (`native.py`); where it cannot be built, attention
stays on SDPA."""

from __future__ import annotations

import torch

from moe_local import native

# Queries per KV head up to which the kernel is the faster (its time grows with each query, SDPA's less),
# 900 bf16 positions, 2 threads, cache cold. Where bf16 keys are multiplied as bf16 pairs (AVX512-BF16): 8
# KV heads of 64, 8 queries 177 us against SDPA's 250, 16 281 against 346, 64 924 against 984; one latent of
# 576 (DeepSeek), 64 queries 722 against 1,306. Widening each key to fp32 first (fp32 caches, or CPUs without
# it): 4 queries 128 against 182, 8 194 against 223, 12 267 against 262; the latent, 32 567 against 623.
# A decode step's g (or DeepSeek's H) is within these; prefill chunks stay on SDPA.
MAX_QUERIES = {True: (32, 128), False: (8, 32)}  # bf16 pairs or not: (per KV head, over one latent of 256 or more)


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

"""The transformer in plain PyTorch, assembled once from the pieces a `ModelConfig` names: GQA `Attention`
(biases, q/k norm, clipping, partial rotary, sliding windows) or DeepSeek's `LatentAttention`; per layer a
`DenseMLP` or a `MoE` block (a `Router`, the routed experts behind the expert runtime
`experts(layer, x, weights, indices) -> y`, and an optional shared expert). The forward pass is the same
for every family."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moe_local import cpu_attention, cpu_deltanet, cpu_matmul, cpu_mlp, int4
from moe_local.budget import lm_head_quantized
from moe_local.config import ModelConfig
from moe_local.cpu_matmul import WideLinear, onednn
from moe_local.int4 import Int4Linear
from moe_local.int8 import Int8Linear
from moe_local.routing import route

MLA_NORM_EPS = 1e-6  # DeepSeek's q_a/kv_a norms use the default eps whatever rms_norm_eps says


class Experts(Protocol):
    """What the MoE block needs: the weighted sum of each token's chosen experts."""

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """RMSNorm; `offset`: the zero-centred form of Qwen3-Next and Qwen3.5, whose stored weight w scales by
    1 + w, in fp32 as their reference computes it."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset:
            return (F.rms_norm(x.float(), self.weight.shape, eps=self.eps) * (1.0 + self.weight.float())).to(x.dtype)
        # Normalise in fp32, then scale in the compute dtype, as the reference does (one fused op, same bits).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Gated DeltaNet's output norm: RMSNorm per value head, then times silu(z), the gate from the input."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return (h * F.silu(gate.float())).to(x.dtype)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [T, rd] and the signed sin [T, rd] (first half negated) that `apply_rope` takes; YaRN scales both."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # [T, rd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, rd]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    sin = sin.to(dtype)
    sin[:, : freqs.shape[1]].neg_()
    return cos.to(dtype), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [..., T, hd]. Rotates the two halves of the first rd = cos.shape[-1] dimensions of each head (the
    Hugging Face layout), the rest pass: the reference's x * cos + cat(-x2, x1) * sin, bit for bit, as
    x * cos + cat(x2, x1) * cat(-sin, sin)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + x.roll(rd // 2, dims=-1) * signed_sin
    rot = x[..., :rd]
    return torch.cat([rot * cos + rot.roll(rd // 2, dims=-1) * signed_sin, x[..., rd:]], dim=-1)


def sliding_mask(pos: int, T: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[T, pos+T] bool: query i (at position pos+i) sees keys at positions <= pos+i, within the window;
    None when every query sees every key (one decode step inside the window)."""
    if T == 1 and (not window or pos < window):
        return None
    q_pos = torch.arange(pos, pos + T, device=device)[:, None]
    k_pos = torch.arange(pos + T, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    return allowed


class QKNorm(nn.Module):
    """RMSNorm of the queries and keys inside the fused q|k|v projection output [T, (H + 2Hkv) hd]: per
    head (Qwen3, GLM: one weight of hd for all heads) or over the whole projection (OLMoE); and, where the
    family has it (Gemma 4), of the values per head without a weight."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, (hd, hkv) = cfg.n_heads, cfg.layer_geometry(layer)
        self.per_head, self.split = cfg.qk_norm == "head", [h * hd, hkv * hd, hkv * hd]
        self.q_norm = RMSNorm(hd if self.per_head else h * hd, cfg.norm_eps, cfg.norm_offset)
        self.k_norm = RMSNorm(hd if self.per_head else hkv * hd, cfg.norm_eps, cfg.norm_offset)
        self.head_dim, self.v_norm, self.eps = hd, cfg.v_norm, cfg.norm_eps

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.split(self.split, dim=-1)
        T = qkv.shape[0]
        if self.per_head:
            q = self.q_norm(q.view(T, -1, self.head_dim)).view(T, -1)
            k = self.k_norm(k.view(T, -1, self.head_dim)).view(T, -1)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm:
            v = F.rms_norm(v.view(T, -1, self.head_dim).float(), (self.head_dim,), eps=self.eps).to(v.dtype).view(T, -1)
        return torch.cat([q, k, v], dim=-1)


def attend(q, keys, values, mask, scale: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """q [..., T, hd] over keys and values [..., S, hd] (mask [..., T, S] bool or None) -> [..., T, hd],
    contiguous (CUDA's SDPA kernels may return another memory order; the callers view the result). With
    sinks (one logit per query head, shaped to broadcast against the scores' [..., T, 1]), each head's
    softmax has one more logit in its denominator and nothing to weight, as gpt-oss does; SDPA has no such
    term, so that case is computed by hand. A decode step on the CPU takes moe-local's own kernel
    (`cpu_attention`), where it could be built."""
    if q.device.type == "cpu" and (y := cpu_attention.attend(q, keys, values, mask, scale, sinks)) is not None:
        return y
    if sinks is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).contiguous()
    with onednn(q.device.type == "cpu"):
        scores = torch.matmul(q, keys.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)  # [..., T, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        logits = torch.cat([scores, sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]  # [..., T, S]
        return torch.matmul(probs.to(values.dtype), values)


class Attention(nn.Module):
    """Grouped-query attention over a static per-layer cache of keys and values [Hkv, positions, hd] each.
    A sliding layer whose window is shorter than the context keeps only the window, as a ring: position p
    lives in slot p % window. Gated (Qwen3-Next, Qwen3.5): the q projection gives each head a gate too, and
    the heads' output is multiplied by sigmoid(gate) before wo."""

    recurrent = False  # the cache holds each position's keys and values: a prefix of it is a shorter sequence's

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        (hd, hkv), h = cfg.layer_geometry(layer), cfg.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = h, hkv, hd
        self.gated = cfg.attn_gate
        # q (gate), k and v projections as one matrix (rows: q heads, gate heads, k heads, v heads): one matmul,
        # not three. Where the values are the keys' projection (Gemma 4's full layers) it has no value rows
        self.values_from_keys = cfg.values_from_keys(layer)
        kv = hkv * (1 + (not self.values_from_keys))
        self.wqkv = nn.Linear(cfg.dim, (h * (1 + self.gated) + kv) * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(h * hd, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = QKNorm(cfg, layer) if cfg.qk_norm else None
        self.clip = cfg.clip_qkv
        self.scale = cfg.attn_scale or None
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sinks else None
        self.window = cfg.layer_windows[layer]

    @staticmethod
    def cache_shapes(cfg: ModelConfig, ctx_size: int, layer: int) -> list[tuple[int, ...]]:
        hd, hkv = cfg.layer_geometry(layer)
        return [(hkv, cfg.cache_positions(layer, ctx_size), hd)] * 2  # keys, values

    @staticmethod
    def cache_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
        return [dtype, dtype]

    def quantize(self, make: Callable[[nn.Linear], nn.Module]) -> None:
        self.wqkv, self.wo = make(self.wqkv), make(self.wo)

    def forward(self, x, cos, sin, cache: tuple[torch.Tensor, ...], pos: int) -> torch.Tensor:
        q, k, v, gate = self._project(x, cos, sin)
        y = self._attend(q, k, v, cache, pos)  # [H, T, hd]
        return self._out(y.transpose(0, 1).reshape(x.shape[0], -1), gate)

    def _out(self, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The heads' output [T, H hd] (times sigmoid(gate) where gated) through wo -> [T, D]."""
        return self.wo(y if gate is None else y * torch.sigmoid(gate))

    def forward_static(self, x, cos, sin, cache: tuple[torch.Tensor, ...], pos: torch.Tensor) -> torch.Tensor:
        """One token, x [1, D], at the position held on the device in `pos` ([1] long), with shapes that do
        not depend on it (what a CUDA graph needs): the cache is written with `index_copy_` (at pos modulo
        a ring's window) and attended whole, masked to the slots written so far."""
        q, k, v, gate = self._project(x, cos, sin)  # [H, 1, hd], [Hkv, 1, hd], [Hkv, 1, hd]
        k_cache, v_cache = cache
        C = k_cache.shape[1]
        slot = pos % C if C == self.window else pos
        k_cache.index_copy_(1, slot, k)
        v_cache.index_copy_(1, slot, v)
        mask = (torch.arange(C, device=x.device) <= pos)[None, :]  # [1, C]
        return self._out(self._attend_grouped(q, k_cache, v_cache, mask).reshape(1, -1), gate)

    def forward_batch(self, x, cos, sin, caches: list[tuple[torch.Tensor, ...]], positions: list[int], pooled: Pooled | None = None) -> torch.Tensor:
        """x [B, D]: the next token of each of B sequences, sequence b at positions[b] over its own caches[b].
        The projections run on all B rows at once. When the caches are rows of one `KVPool` (`pooled`), so is
        the attention core: one write of the B new keys and values, one attention over the pool's rows;
        otherwise the core runs per sequence."""
        q, k, v, gate = self._project(x, cos, sin)  # [H, B, hd], [Hkv, B, hd], [Hkv, B, hd]
        if pooled is not None:
            y = self._attend_pooled(q, k, v, pooled)  # [B, H, hd]
            return self._out(y.reshape(x.shape[0], -1), gate)
        ys = [
            self._attend(q[:, b : b + 1], k[:, b : b + 1], v[:, b : b + 1], cache, pos)  # [H, 1, hd]
            for b, (cache, pos) in enumerate(zip(caches, positions))
        ]
        return self._out(torch.cat(ys, dim=1).transpose(0, 1).reshape(x.shape[0], -1), gate)  # [H, B, hd] -> [B, D]

    def _attend_pooled(self, q, k, v, pooled: Pooled) -> torch.Tensor:
        """q [H, B, hd], k and v [Hkv, B, hd] of B sequences that are rows of a pool -> [B, H, hd]. Keys and
        values are written at each row's slot (its position, or position % window in a ring); then the
        pool's rows lo..lo+n-1 attend as one batch, each row masked to its own valid slots (rows outside the
        batch see slot 0 and are dropped)."""
        (k_pool, v_pool), p = pooled.layer, pooled  # [N, Hkv, C, hd] each
        H, Hkv, hd, C = self.n_heads, self.n_kv_heads, self.head_dim, k_pool.shape[2]
        # a sliding layer's cache is a ring of its window, or the whole context where that is shorter
        slot = p.positions % C if C == self.window else p.positions  # [B]
        k_pool[p.rows, :, slot] = k.transpose(0, 1)  # [B, Hkv, hd]
        v_pool[p.rows, :, slot] = v.transpose(0, 1)
        S = min(C, p.seen.shape[1])  # slots any of them sees
        keys, values = k_pool[p.lo : p.lo + p.n, :, :S], v_pool[p.lo : p.lo + p.n, :, :S]  # views [n, Hkv, S, hd]
        mask = p.seen[:, :S]  # a ring holds its window's positions in some order: every slot written so far
        queries = q.new_zeros(p.n, H, hd)
        queries[p.rows - p.lo] = q.transpose(0, 1)
        # each KV head's g query heads are g queries of it
        g = H // Hkv
        sinks = None if self.sinks is None else self.sinks.view(Hkv, g, 1)
        y = attend(queries.view(p.n, Hkv, g, hd), keys, values, mask[:, None, None, :], self.scale, sinks)  # [n, Hkv, g, hd]
        return y.view(p.n, H, hd)[p.rows - p.lo]

    def _project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [T, D] -> rotated queries [H, T, hd], rotated keys and values [Hkv, T, hd], and the output gate
        [T, H hd] (None unless gated)."""
        T, H, Hkv = x.shape[0], self.n_heads, self.n_kv_heads
        qkv, gate = self.wqkv(x), None  # [T, (H + 2Hkv) hd], or [T, (2H + 2Hkv) hd] with the gate after q
        if self.gated:
            q, gate, kv = qkv.split([H * self.head_dim, H * self.head_dim, 2 * Hkv * self.head_dim], dim=-1)
            qkv = torch.cat([q, kv], dim=-1)
        if self.values_from_keys:  # [T, (H + Hkv) hd]: the keys' rows once more, as values
            qkv = torch.cat([qkv, qkv[:, H * self.head_dim :]], dim=-1)
        if self.qk_norm is not None:
            qkv = self.qk_norm(qkv)
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        qkv = qkv.view(T, H + 2 * Hkv, self.head_dim).transpose(0, 1)  # [H + 2Hkv, T, hd]
        q, k = apply_rope(qkv[: H + Hkv], cos, sin).split([H, Hkv])  # [H, T, hd], [Hkv, T, hd]
        return q, k, qkv[H + Hkv :], gate

    def _attend(self, q, k, v, cache: tuple[torch.Tensor, ...], pos: int) -> torch.Tensor:
        """Write k, v [Hkv, T, hd] at positions pos.. into the cache; q [H, T, hd] over it -> [H, T, hd]."""
        T = q.shape[1]
        k_cache, v_cache = cache
        if k_cache.shape[1] == self.window:
            keys, values, mask = self._ring(k_cache, v_cache, k, v, pos)
        else:
            k_cache[:, pos : pos + T] = k
            v_cache[:, pos : pos + T] = v
            keys, values = k_cache[:, : pos + T], v_cache[:, : pos + T]  # [Hkv, S, hd]
            mask = sliding_mask(pos, T, self.window, q.device)
        return self._attend_grouped(q, keys, values, mask)

    def _attend_grouped(self, q, keys, values, mask) -> torch.Tensor:
        """q [H, T, hd] over keys and values [Hkv, S, hd] (mask [T, S] bool or None) -> [H, T, hd]. Each KV
        head's g query heads are g*T queries of it, so that the keys and values are read as they lie: SDPA's
        enable_gqa takes the CPU's math kernel (29 ms for one Mixtral decode token at 2k positions, against
        0.5), and with a mask sends CUDA there too; repeating the keys per head copies the cache."""
        (H, T, hd), Hkv = q.shape, self.n_kv_heads
        g = H // Hkv
        queries = q.reshape(1, Hkv, g * T, hd)  # query head h = i*g + j at row j*T + t of KV head i
        mask = None if mask is None else mask.repeat(g, 1)  # [g*T, S]
        sinks = None if self.sinks is None else self.sinks.view(1, Hkv, g, 1).repeat_interleave(T, dim=2)  # [1, Hkv, g*T, 1]
        y = attend(queries, keys[None], values[None], mask, self.scale, sinks)  # [1, Hkv, g*T, hd]
        return y.view(H, T, hd)

    def _ring(self, k_cache, v_cache, k, v, pos: int):
        """Keys and values for queries at pos..pos+T-1 from a window-sized ring (the window's older
        positions, then the new ones) and the mask over them; then the newest positions go into the ring."""
        W, T, device = self.window, k.shape[1], k.device
        start = max(0, pos - (W - 1))  # the oldest position any of these queries sees
        slots = torch.arange(start, pos, device=device) % W
        keys = torch.cat([k_cache[:, slots], k], dim=1)  # [Hkv, pos - start + T, hd]
        values = torch.cat([v_cache[:, slots], v], dim=1)
        mask = None
        if T > 1:
            k_pos = torch.arange(start, pos + T, device=device)[None, :]
            q_pos = torch.arange(pos, pos + T, device=device)[:, None]
            mask = (k_pos <= q_pos) & (k_pos > q_pos - W)  # [T, S]
        kept = min(T, W)  # only the last W positions stay
        new = torch.arange(pos + T - kept, pos + T, device=device) % W
        k_cache[:, new], v_cache[:, new] = k[:, T - kept :], v[:, T - kept :]
        return keys, values, mask


SCORE_BYTES = 1 << 27  # the most memory the indexer's per-head scores of a prefill chunk take at once


class Indexer(nn.Module):
    """DeepSeek Sparse Attention's lightning indexer, the piece beside `LatentAttention` that chooses which past
    tokens each query attends to. Per token it caches one key [head_dim] (its own projection, LayerNorm and
    rotary, in halves, on the first rope dims); a query's `n_heads` heads (from MLA's query latent) score every
    cached key, the ReLU'd scores are summed with per-head weights (a projection kept in fp32, as transformers
    does), and the `topk` best of the keys the query may see are kept: all of them while there are no more."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ix = cfg.indexer
        self.n_heads, self.head_dim, self.topk = ix.n_heads, ix.head_dim, ix.topk
        self.wq = nn.Linear(cfg.mla.q_lora_rank, ix.n_heads * ix.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, ix.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(ix.head_dim, eps=1e-6)
        self.weights = nn.Linear(cfg.dim, ix.n_heads, bias=False)
        self.scale = ix.head_dim**-0.5
        # GLM-5.2: the masks `select` returned in this forward, in order, for the shared layers after this one
        # (`SharedIndexer`); kept only where there are such layers (`Transformer` links them)
        self.followed, self.kept = False, []

    def project(self, x, q_latent, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D], MLA's query latent [T, q_lora] -> queries [T, H, hd] fp32, head weights [T, H] fp32, keys [T, hd].
        Every forward of the layer calls it once, first: a new forward's selections start here."""
        T = x.shape[0]
        self.kept = []
        q = apply_rope(self.wq(q_latent).view(T, self.n_heads, self.head_dim).transpose(0, 1), cos, sin).transpose(0, 1)
        k = apply_rope(self.k_norm(self.wk(x)), cos, sin)
        w = self.weights(x.to(self.weights.weight.dtype)).float() * self.n_heads**-0.5
        return q.float(), w, k

    def select(self, q, w, keys, visible: torch.Tensor) -> torch.Tensor:
        """queries q [..., T, H, hd] and weights w [..., T, H] over cached keys [..., S, hd]; visible [..., T, S]
        bool (what each query may see) -> the same, keeping only each query's `topk` best-scored keys. The
        per-head scores [T, H, S] fp32 are made for `SCORE_BYTES` worth of queries at a time (a 512-token chunk
        of DeepSeek-V3.2's 64 heads over 16k positions would be 2 GiB); each query's are its own matmul, so
        the slices change nothing."""
        mask = self._select(q, w, keys, visible)
        if self.followed:
            self.kept.append(mask)
        return mask

    def _select(self, q, w, keys, visible: torch.Tensor) -> torch.Tensor:
        S, T = keys.shape[-2], q.shape[-3]
        if S <= self.topk:  # every key can be kept: nothing to score
            return visible
        rows = max(1, SCORE_BYTES // (4 * self.n_heads * S))
        if T > rows:
            return torch.cat([self._select(q[..., i : i + rows, :, :], w[..., i : i + rows, :], keys, visible[..., i : i + rows, :])
                              for i in range(0, T, rows)], dim=-2)  # fmt: skip
        scores = F.relu(torch.matmul(q, keys.float().transpose(-1, -2).unsqueeze(-3)) * self.scale)  # [..., T, H, S]
        index = torch.matmul(w.unsqueeze(-2), scores).squeeze(-2).masked_fill(~visible, float("-inf"))  # [..., T, S]
        chosen = index.topk(self.topk, dim=-1).indices
        return visible & torch.zeros_like(visible).scatter_(-1, chosen, True)


class SharedIndexer:
    """A layer without an indexer of its own (GLM-5.2's "shared" layers): each query keeps what it kept in the
    last layer before with one (`source`, which `Transformer` links). It answers `Indexer`'s calls with
    zero-width queries, weights and keys (its cache of them takes no bytes), and `select` with the source's
    selections of this forward in the order the source made them: every path of `LatentAttention` selects
    in the same order in every layer (the whole step, or sequence after sequence)."""

    def __init__(self, cfg: ModelConfig):
        self.topk = cfg.indexer.topk
        self.source: Indexer | None = None
        self.taken = 0

    def project(self, x, q_latent, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = x.shape[0]
        self.taken = 0
        return x.new_zeros(T, 0, 0, dtype=torch.float32), x.new_zeros(T, 0, dtype=torch.float32), x.new_zeros(T, 0)

    def select(self, q, w, keys, visible: torch.Tensor) -> torch.Tensor:
        mask = self.source.kept[self.taken]
        self.taken += 1
        return mask


class LatentAttention(nn.Module):
    """DeepSeek's Multi-head Latent Attention. The cache holds per token only the normalised latent c
    [r] and the rotated shared key [rope], [ctx, r + rope]. Attention runs in the latent space ("absorbed"):
    each head's query-key part is mapped through its slice of kv_b (q_nope W_uk -> [r]), scored against
    [c | k_rope] and the weighted sum of c is mapped out by W_uv, so no full keys or values are ever
    built: the same result as expanding c, with per-step work independent of the number of heads' keys."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.mla
        self.n_heads, self.nope, self.rope, self.rank, self.v_dim = cfg.n_heads, m.nope_dim, m.rope_dim, m.kv_lora_rank, m.v_dim
        if m.q_lora_rank is None:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * m.qk_dim, bias=False)
        else:
            self.wq = nn.Sequential(
                nn.Linear(cfg.dim, m.q_lora_rank, bias=cfg.qkv_bias), RMSNorm(m.q_lora_rank, MLA_NORM_EPS),
                nn.Linear(m.q_lora_rank, cfg.n_heads * m.qk_dim, bias=False),
            )
        self.wkv_a = nn.Linear(cfg.dim, m.kv_lora_rank + m.rope_dim, bias=cfg.qkv_bias)
        self.kv_norm = RMSNorm(m.kv_lora_rank, MLA_NORM_EPS)
        self.wkv_b = nn.Linear(m.kv_lora_rank, cfg.n_heads * (m.nope_dim + m.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * m.v_dim, cfg.dim, bias=cfg.o_bias)
        self.scale = cfg.attn_scale
        # DeepSeek Sparse Attention: an indexer of this layer's own, or (GLM-5.2) an earlier layer's choice
        ix = cfg.indexer
        self.indexer = None if ix is None else Indexer(cfg) if ix.own(layer) else SharedIndexer(cfg)

    recurrent = False

    @staticmethod
    def cache_shapes(cfg: ModelConfig, ctx_size: int, layer: int) -> list[tuple[int, ...]]:
        """The latent and rotary key [ctx, r + rope]; with an indexer, its keys [ctx, index head_dim] too (none,
        [ctx, 0], in a layer that keeps an earlier one's choice)."""
        ix = cfg.indexer
        index = [] if ix is None else [(ctx_size, ix.head_dim if ix.own(layer) else 0)]
        return [(ctx_size, cfg.mla.kv_lora_rank + cfg.mla.rope_dim), *index]

    @staticmethod
    def cache_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
        return [dtype, dtype]  # the latents' (and the indexer's keys', where there is an indexer)

    def quantize(self, make: Callable[[nn.Linear], nn.Module]) -> None:
        """Every projection but kv_b, which the absorbed attention reads as per-head slices."""
        if isinstance(self.wq, nn.Sequential):
            self.wq[0], self.wq[2] = make(self.wq[0]), make(self.wq[2])
        else:
            self.wq = make(self.wq)
        self.wkv_a, self.wo = make(self.wkv_a), make(self.wo)

    def forward(self, x, cos, sin, cache: tuple[torch.Tensor, ...], pos: int) -> torch.Tensor:
        query, entry, index = self._project(x, cos, sin)
        return self._out(self._attend(query, entry, cache, pos, index))

    def forward_static(self, x, cos, sin, cache: tuple[torch.Tensor, ...], pos: torch.Tensor) -> torch.Tensor:
        """As `Attention.forward_static`: one token at the position in `pos`, the whole cache attended, masked
        (and, with an indexer, to the keys it keeps: `topk` of the C slots, the unwritten ones scored -inf)."""
        query, entry, index = self._project(x, cos, sin)  # [H, 1, r + rope], [1, r + rope]
        latents, *index_keys = cache
        latents.index_copy_(0, pos, entry)
        mask = (torch.arange(latents.shape[0], device=x.device) <= pos)[None, :]  # [1, C]
        if index is not None:
            q, w, k = index
            index_keys[0].index_copy_(0, pos, k)
            mask = self.indexer.select(q, w, index_keys[0], mask)
        return self._out(self._attend_latent(query, latents, mask))

    def forward_batch(self, x, cos, sin, caches: list[tuple[torch.Tensor, ...]], positions: list[int], pooled: Pooled | None = None) -> torch.Tensor:
        """x [B, D]: the next token of each of B sequences, sequence b at positions[b] over its own caches[b];
        as `Attention.forward_batch`, one attention for the batch when the caches are rows of one pool."""
        query, entry, index = self._project(x, cos, sin)  # [H, B, r + rope], [B, r + rope]
        if pooled is not None:
            return self._out(self._attend_pooled(query, entry, pooled, index))
        ys = [
            self._attend(query[:, b : b + 1], entry[b : b + 1], cache, pos, None if index is None else tuple(t[b : b + 1] for t in index))
            for b, (cache, pos) in enumerate(zip(caches, positions))
        ]
        return self._out(torch.cat(ys, dim=1))  # [H, B, r]

    def _attend_pooled(self, query, entry, p: Pooled, index=None) -> torch.Tensor:
        """query [H, B, r + rope] and entry [B, r + rope] of B sequences that are rows of a pool -> [H, B, r]:
        the entries written at each row's position, then the pool's rows lo..lo+n-1 attended as one batch,
        each row masked to its own positions (rows outside the batch see position 0 and are dropped), and to
        the keys its indexer keeps."""
        pool, *index_pool = p.layer  # [N, C, r + rope] (and [N, C, index head_dim])
        H, r = self.n_heads, self.rank
        pool[p.rows, p.positions] = entry
        S = min(pool.shape[1], p.seen.shape[1])
        keys = pool[p.lo : p.lo + p.n, None, :S]  # [n, 1, S, r + rope]: one latent for every head
        mask = p.seen[:, :S]
        if index is not None:
            q, w, k = index  # [B, Hi, hd], [B, Hi], [B, hd]
            index_pool[0][p.rows, p.positions] = k
            queries, weights = q.new_zeros(p.n, 1, *q.shape[1:]), w.new_zeros(p.n, 1, w.shape[1])
            queries[p.rows - p.lo, 0], weights[p.rows - p.lo, 0] = q, w
            mask = self.indexer.select(queries, weights, index_pool[0][p.lo : p.lo + p.n, :S], mask[:, None, :])[:, 0]
            if S > self.indexer.topk:  # each row reads the topk latents it keeps (a row that sees fewer: masked)
                kept = mask.to(torch.uint8).topk(self.indexer.topk, dim=-1).indices  # [n, topk]
                keys = keys.gather(2, kept[:, None, :, None].expand(-1, 1, -1, keys.shape[-1]))  # [n, 1, topk, r + rope]
                mask = mask.gather(-1, kept)
        queries = query.new_zeros(p.n, 1, H, query.shape[-1])  # each row's H queries of its one latent (see _attend_latent)
        queries[p.rows - p.lo] = query.transpose(0, 1)[:, None]
        y = attend(queries, keys, keys[..., :r], mask[:, None, None, :], self.scale, None)  # [n, 1, H, r]
        return y[p.rows - p.lo, 0].transpose(0, 1)  # [H, B, r]

    def _project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """x [T, D] -> the absorbed queries [H, T, r + rope], the cache entries [T, r + rope] and, with an
        indexer, its queries, head weights and keys (`Indexer.project`, from the query latent)."""
        T, H, r = x.shape[0], self.n_heads, self.rank
        if self.indexer is None:
            q, index = self.wq(x), None
        else:
            q_latent = self.wq[1](self.wq[0](x))  # [T, q_lora]
            q, index = self.wq[2](q_latent), self.indexer.project(x, q_latent, cos, sin)
        q = q.view(T, H, self.nope + self.rope).transpose(0, 1)  # [H, T, nope + rope]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.wkv_a(x).split([r, self.rope], dim=-1)  # [T, r], [T, rope]
        entry = torch.cat([self.kv_norm(latent), apply_rope(k_rope, cos, sin)], dim=-1)
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, r)
        with onednn(x.device.type == "cpu"):
            q_latent = torch.matmul(q_nope, w[:, : self.nope])  # [H, T, nope] @ [H, nope, r] -> [H, T, r]
        return torch.cat([q_latent, apply_rope(q_rope, cos, sin)], dim=-1), entry, index

    def _attend(self, query, entry, cache: tuple[torch.Tensor, ...], pos: int, index=None) -> torch.Tensor:
        """Write entry [T, r + rope] at positions pos.. into the cache (and the indexer's keys into theirs);
        query [H, T, r + rope] over it, each query over the keys its indexer keeps -> [H, T, r]."""
        T = entry.shape[0]
        latents, *index_keys = cache
        latents[pos : pos + T] = entry
        mask = sliding_mask(pos, T, None, query.device)  # [T, pos + T] or None (one query sees all)
        if index is not None:
            q, w, k = index
            index_keys[0][pos : pos + T] = k
            if pos + T > self.indexer.topk:  # else every query keeps every key it sees
                visible = mask if mask is not None else torch.ones(1, pos + T, dtype=torch.bool, device=query.device)
                mask = self.indexer.select(q, w, index_keys[0][: pos + T], visible)
                if T == 1:  # a decode step reads only the topk latents it keeps, not every cached one under a mask
                    return self._attend_latent(query, latents[mask[0].nonzero()[:, 0]], None)
        return self._attend_latent(query, latents[: pos + T], mask)

    def _attend_latent(self, query, entries, mask) -> torch.Tensor:
        """query [H, T, r + rope] over cache entries [S, r + rope] (mask [T, S] bool or None) -> [H, T, r]. Every
        head scores against the same latent, so the H*T queries are queries of one "head" and SDPA reads the
        cache once; expanding it per head sends the CPU to the math kernel (30 ms a decode layer of
        DeepSeek-V2-Lite at 1k positions, against 1)."""
        (H, T, _), r = query.shape, self.rank
        keys = entries[None, None]  # [1, 1, S, r + rope]
        mask = None if mask is None else mask.repeat(H, 1)  # [H*T, S]
        y = attend(query.reshape(1, 1, H * T, -1), keys, keys[..., :r], mask, self.scale, None)  # [1, 1, H*T, r]
        return y.view(H, T, r)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """[H, T, r] in the latent space -> [T, D]."""
        w = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        y = torch.matmul(y, w[:, self.nope :].transpose(1, 2))  # [H, T, r] @ [H, r, v] -> [H, T, v]
        return self.wo(y.transpose(0, 1).reshape(y.shape[1], -1))


CHUNK = 64  # positions per chunk of the chunked gated delta rule, as the reference's torch_chunk_gated_delta_rule


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last dimension, as the reference (and the FLA library) compute it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _delta_inputs(q, k, v, beta, heads: int):
    """q, k [..., Hk, dk] -> fp32, each query/key head repeated for its Hv / Hk value heads, L2-normalised
    (q also scaled by dk^-1/2); v, beta -> fp32."""
    g = heads // q.shape[-2]
    if g > 1:
        q, k = q.repeat_interleave(g, dim=-2), k.repeat_interleave(g, dim=-2)
    q, k = l2norm(q.float()), l2norm(k.float())
    return q * q.shape[-1] ** -0.5, k, v.float(), beta.float()


def recurrent_step(q, k, v, g, beta, state) -> torch.Tensor:
    """One position of the gated delta rule for B sequences, the decode step of a linear-attention layer:

        q, k   [B, Hk, dk]  after the convolution and silu, before normalising (compute dtype)
        v      [B, Hv, dv]  (compute dtype)
        g      [B, Hv]      fp32, the log of the state's decay (<= 0)
        beta   [B, Hv]      the write strength, sigmoid(b) (compute dtype)
        state  [B, Hv, dk, dv] fp32, updated in place
        -> y   [B, Hv, dv]  fp32

    The state decays by exp(g), then for the normalised key k it is corrected towards v by beta (the delta
    rule: S += k (beta (v - S^T k))^T); the output reads it with the normalised, scaled query. Pure torch:
    a CPU kernel may replace it (same arguments, same result)."""
    q, k, v, beta = _delta_inputs(q, k, v, beta, v.shape[-2])
    state.mul_(g.exp()[..., None, None])
    kv_mem = torch.einsum("bhkv,bhk->bhv", state, k)  # [B, Hv, dv]: what the state recalls for k
    delta = (v - kv_mem) * beta[..., None]
    state.add_(k[..., :, None] * delta[..., None, :])
    return torch.einsum("bhkv,bhk->bhv", state, q)


def chunked_delta_rule(q, k, v, g, beta, state) -> torch.Tensor:
    """The gated delta rule over T positions of one sequence, in chunks of CHUNK (the reference's
    torch_chunk_gated_delta_rule): within a chunk the updates are solved as one triangular system, so the
    work is a few matmuls per chunk and linear in T. q, k [T, Hk, dk]; v [T, Hv, dv]; g, beta [T, Hv];
    state [Hv, dk, dv] fp32, the state before the first position, updated in place to the one after the
    last -> y [T, Hv, dv] fp32. (`cpu_deltanet.chunked` is the same in a kernel: the CPU's prefill.)"""
    T, Hv = v.shape[0], v.shape[1]
    q, k, v, beta = (t.transpose(0, 1) for t in _delta_inputs(q, k, v, beta, Hv))  # [Hv, T, ...], beta [Hv, T]
    g = g.float().transpose(0, 1)  # [Hv, T]
    pad = (CHUNK - T % CHUNK) % CHUNK
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    n, C = (T + pad) // CHUNK, CHUNK
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (t.reshape(Hv, n, C, t.shape[-1]) for t in (q, k, k_beta, v_beta))  # [Hv, n, C, d]
    decay = g.reshape(Hv, n, C).cumsum(dim=-1)  # [Hv, n, C]: log decay from the chunk's start to each position
    upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [Hv, n, C, C]
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False, unitriangular=True)
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [Hv, n, 1, 1]
    out = torch.empty_like(new_values)  # [Hv, n, C, dv]
    for i in range(n):  # the sequential scan over chunks
        v_new = new_values[:, i] - k_decayed[:, i] @ state
        out[:, i] = q[:, i] @ state + intra[:, i] @ v_new
        state.mul_(chunk_decay[:, i]).add_(k[:, i].transpose(-1, -2) @ v_new)
    return out.reshape(Hv, n * C, -1)[:, :T].transpose(0, 1)  # [T, Hv, dv]


class LinearAttention(nn.Module):
    """Gated DeltaNet (Qwen3-Next, Qwen3.5): one input projection gives q, k, v (through a causal depthwise
    convolution of `conv_kernel` positions and silu), the output gate z, and per value head b and a; the
    gated delta rule runs on an fp32 recurrent state [Hv, dk, dv] with decay exp(g), g = -exp(A_log)
    softplus(a + dt_bias), and write strength sigmoid(b); the output is RMSNorm'd per head, times silu(z),
    and projected back. Per sequence the cache is (the last conv_kernel - 1 inputs of the convolution
    [conv_dim, conv_kernel - 1], the recurrent state): a fixed size, but a state of everything the sequence
    has seen, which cannot be cut back to a prefix (`recurrent`). Prefill runs the chunked form of the delta
    rule (on the CPU `cpu_deltanet.chunked`'s kernel, where it takes the sizes), a decode step `recurrent_step`. A forward at position 0 starts from zero state."""

    recurrent = True

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        lin = cfg.linear
        self.k_heads, self.v_heads, self.k_dim, self.v_dim = lin.k_heads, lin.v_heads, lin.k_head_dim, lin.v_head_dim
        self.split = [lin.conv_dim, lin.value_dim, lin.v_heads, lin.v_heads]  # q|k|v, z, b, a
        self.in_proj = nn.Linear(cfg.dim, lin.in_rows, bias=False)
        self.conv = nn.Parameter(torch.empty(lin.conv_dim, lin.conv_kernel))  # [channels, kernel], the newest input last
        self.A_log = nn.Parameter(torch.empty(lin.v_heads))
        self.dt_bias = nn.Parameter(torch.empty(lin.v_heads))
        self.norm = GatedRMSNorm(lin.v_head_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(lin.value_dim, cfg.dim, bias=False)
        self.fused: cpu_deltanet.Fused | None = None  # a decode step in one kernel call (`fuse`)

    @staticmethod
    def cache_shapes(cfg: ModelConfig, ctx_size: int, layer: int) -> list[tuple[int, ...]]:
        lin = cfg.linear
        return [(lin.conv_dim, lin.conv_kernel - 1), (lin.v_heads, lin.k_head_dim, lin.v_head_dim)]

    @staticmethod
    def cache_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
        return [dtype, torch.float32]

    def quantize(self, make: Callable[[nn.Linear], nn.Module]) -> None:
        self.in_proj, self.out_proj = make(self.in_proj), make(self.out_proj)

    def fuse(self) -> bool:
        """On the CPU, after any quantization: a decode step (one token, or one of each sequence of a batch)
        from the input projection to out_proj as one kernel call (`cpu_deltanet.Fused`), where it applies;
        whether it does."""
        self.fused = cpu_deltanet.Fused.build(self)
        return self.fused is not None

    def forward(self, x, cos, sin, cache: tuple[torch.Tensor, ...], pos: int) -> torch.Tensor:
        """x [T, D] at positions pos.. of the sequence whose state `cache` holds -> [T, D]."""
        conv_state, state = cache  # [C, K-1], [Hv, dk, dv]
        if pos == 0:
            conv_state.zero_()
            state.zero_()
        if x.shape[0] == 1 and self.fused is not None and (y := self.fused(x, [conv_state], [state])) is not None:
            return y
        mixed, z, b, a = self.in_proj(x).split(self.split, dim=-1)  # [T, C], [T, Hv dv], [T, Hv], [T, Hv]
        if x.shape[0] == 1:  # a decode step
            y = self._step(mixed, b, a, conv_state[None], state[None])  # [1, Hv, dv]
        else:
            q, k, v = self._heads(self._conv(mixed, conv_state))
            g, beta = self._decay(a), b.sigmoid()
            y = cpu_deltanet.chunked(q, k, v, g, beta, state)  # on the CPU the kernel, where it takes the sizes
            if y is None:
                y = chunked_delta_rule(q, k, v, g, beta, state)
        return self._out(y, z)

    def forward_static(self, x, cos, sin, cache: tuple[torch.Tensor, ...], pos: torch.Tensor) -> torch.Tensor:
        """A decode step, x [1, D], with shapes that do not depend on the position (never position 0: a
        decode step follows a prefill)."""
        conv_state, state = cache
        mixed, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        return self._out(self._step(mixed, b, a, conv_state[None], state[None]), z)

    def forward_batch(self, x, cos, sin, caches: list[tuple[torch.Tensor, ...]], positions: list[int], pooled: Pooled | None = None) -> torch.Tensor:
        """x [B, D]: the next token of each of B sequences, sequence b at positions[b] over its own state
        caches[b] (a pool's rows or not, alike: the kernel updates each in place; the torch operations gather
        them, step and write them back)."""
        conv_states, states = [c[0] for c in caches], [c[1] for c in caches]
        for conv_state, state, pos in zip(conv_states, states, positions):
            if pos == 0:
                conv_state.zero_()
                state.zero_()
        if self.fused is not None and (y := self.fused(x, conv_states, states)) is not None:
            return y
        mixed, z, b, a = self.in_proj(x).split(self.split, dim=-1)
        conv_state, state = torch.stack(conv_states), torch.stack(states)  # [B, C, K-1], [B, Hv, dk, dv]
        y = self._step(mixed, b, a, conv_state, state)
        for dst, src in zip(conv_states + states, [*conv_state, *state]):
            dst.copy_(src)
        return self._out(y, z)

    def _step(self, mixed, b, a, conv_state, state) -> torch.Tensor:
        """One position of B sequences: mixed [B, C] through the convolution over each sequence's last
        inputs conv_state [B, C, K-1] (updated), then `recurrent_step` on state [B, Hv, dk, dv] -> [B, Hv, dv]."""
        window = torch.cat([conv_state, mixed[..., None]], dim=-1)  # [B, C, K]
        conv_state.copy_(window[..., 1:])
        # the products summed in fp32, as the reference's conv1d accumulates them
        mixed = F.silu((window.float() * self.conv.float()).sum(-1).to(mixed.dtype))
        q, k, v = self._heads(mixed)
        return recurrent_step(q, k, v, self._decay(a), b.sigmoid(), state)

    def _conv(self, mixed: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        """The causal depthwise convolution of T positions, mixed [T, C], after the K-1 inputs before them in
        conv_state [C, K-1] (which then holds the last K-1 of all) -> silu of it, [T, C]."""
        T, K1 = mixed.shape[0], conv_state.shape[1]
        seq = torch.cat([conv_state, mixed.transpose(0, 1)], dim=1)  # [C, K-1+T]
        conv_state.copy_(seq[:, -K1:])
        out = F.conv1d(seq[None], self.conv[:, None, :], groups=seq.shape[0])[0]  # [C, T]
        return F.silu(out).transpose(0, 1)

    def _heads(self, mixed: torch.Tensor):
        """[..., C] -> q, k [..., Hk, dk] and v [..., Hv, dv]."""
        q, k, v = mixed.split([self.k_heads * self.k_dim, self.k_heads * self.k_dim, self.v_heads * self.v_dim], dim=-1)
        lead = mixed.shape[:-1]
        return q.reshape(*lead, self.k_heads, self.k_dim), k.reshape(*lead, self.k_heads, self.k_dim), v.reshape(*lead, self.v_heads, self.v_dim)

    def _decay(self, a: torch.Tensor) -> torch.Tensor:
        """a [..., Hv] -> g = -exp(A_log) softplus(a + dt_bias), the log decay, fp32."""
        return -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The delta rule's output y [T, Hv, dv] (fp32) and the gate z [T, Hv dv] -> [T, D]."""
        T = z.shape[0]
        y = self.norm(y.to(z.dtype).reshape(T * self.v_heads, self.v_dim), z.reshape(T * self.v_heads, self.v_dim))
        return self.out_proj(y.reshape(T, -1))


GATES = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


class DenseMLP(nn.Module):
    """Gated feed-forward, resident: a dense layer's MLP or a shared expert. w13 = gate rows then up rows; the
    gate's activation SiLU (SwiGLU) or tanh's GELU (Gemma 4's GeGLU)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.act, self.gate = act, GATES[act]
        self.fused: cpu_mlp.Fused | None = None  # a decode step's MLP in one call (`fuse`)

    def quantize(self, make: Callable[[nn.Linear], nn.Module]) -> None:
        self.w13, self.w2 = make(self.w13), make(self.w2)

    def fuse(self) -> bool:
        """On the CPU, after any quantization: a decode step's rows (bf16) through one kernel call
        (`cpu_mlp.Fused`), where it applies; whether it does."""
        self.fused = cpu_mlp.Fused.build(self)
        return self.fused is not None

    def forward(self, x: torch.Tensor, experts: Experts | None = None) -> torch.Tensor:
        if self.fused is not None and (y := self.fused(x)) is not None:
            return y
        gate, up = self.w13(x).chunk(2, dim=-1)  # [T, F] each
        return self.w2(self.gate(gate) * up)


class NormedMLP(nn.Module):
    """Gemma 4's dense MLP beside its routed experts: a norm before it and one after."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = DenseMLP(cfg.dim, cfg.shared_ffn_dim, cfg.dense_act)
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.mlp(self.norm(x)))


class Router(nn.Module):
    """Router logits and the family's `route` on them; `likeliest` is what the prefetcher asks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.spec, self.top_k = cfg.router, cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim))
        self.correction_bias = nn.Parameter(torch.zeros(cfg.n_experts)) if cfg.router.correction_bias else None
        self.bias = nn.Parameter(torch.zeros(cfg.n_experts)) if cfg.router_bias else None
        self.input_scale = nn.Parameter(torch.ones(cfg.dim)) if cfg.router.input_scale else None
        self.expert_scale = nn.Parameter(torch.ones(cfg.n_experts)) if cfg.router.expert_scale else None
        self.eps, self.root = cfg.norm_eps, cfg.dim**-0.5

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # Gemma 4: RMS-normalised, times its scale and 1/sqrt(D), as transformers
            x = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.input_scale * self.root
        # an fp32 router keeps its weight in fp32 (see Transformer.from_state_dict)
        x = x.float() if self.spec.fp32 else x
        y = cpu_matmul.rows_linear(x, self.weight, self.bias)  # a step's few bf16 rows on the CPU
        return y if y is not None else F.linear(x, self.weight, self.bias)  # [T, E]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.route(self.logits(x))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(logits, self.top_k, self.spec, self.correction_bias, self.expert_scale)  # [T, k], [T, k]

    def likeliest(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [T, D] -> the n experts [T, n] each token would most likely choose, likeliest first."""
        logits = self.logits(x)
        if self.correction_bias is not None:  # sigmoid scores plus the selection bias choose
            logits = logits.float().sigmoid() + self.correction_bias.float()
        return torch.topk(logits, n, dim=-1).indices  # softmax and sigmoid keep the logits' order


class MoE(nn.Module):
    """Router + routed experts (asked from the runtime under `layer`, this MoE layer's ordinal) + an
    optional shared expert every token uses, scaled by a sigmoid gate in Qwen2-MoE."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = cfg.moe_layers.index(layer)
        self.router = Router(cfg)
        if cfg.expert_norms:  # Gemma 4: the dense MLP and the routed experts each between norms of their own
            self.shared: nn.Module | None = NormedMLP(cfg)
            self.expert_norm, self.expert_out_norm = RMSNorm(cfg.dim, cfg.norm_eps), RMSNorm(cfg.dim, cfg.norm_eps)
        else:
            self.shared = DenseMLP(cfg.dim, cfg.shared_ffn_dim, cfg.dense_act) if cfg.shared_ffn_dim else None
            self.expert_norm = self.expert_out_norm = nn.Identity()
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_gate and cfg.shared_ffn_dim else None

    def forward(self, x: torch.Tensor, experts: Experts) -> torch.Tensor:
        return self.finish(x, self.router.logits(x), self.shared_out(x), experts)

    def shared_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's output (gated, where the family gates it), or None."""
        if self.shared is None:
            return None
        shared = self.shared(x)
        return shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(x)) * shared

    def finish(self, x: torch.Tensor, logits: torch.Tensor, shared: torch.Tensor | None, experts: Experts) -> torch.Tensor:
        """From the router's logits on: routing, the routed experts (the runtime's one host sync), the sum."""
        weights, indices = self.router.route(logits)  # [T, k], [T, k]
        y = self.expert_out_norm(experts(self.layer, self.expert_norm(x), weights, indices))
        return y if shared is None else y + shared


def attention_piece(cfg: ModelConfig, layer: int) -> type[Attention | LatentAttention | LinearAttention]:
    """The attention piece layer `layer` is built from (and whose cache the pool holds for it)."""
    if layer in cfg.linear_layers:
        return LinearAttention
    return Attention if cfg.mla is None else LatentAttention


class Scale(nn.Module):
    """x times a learned scalar (Gemma 4's `layer_scalar`)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Block(nn.Module):
    """x = x + attention_out_norm(attention(attention_norm(x))); x = rescale(x + ffn_out_norm(ffn(ffn_norm(x)))).
    The out norms and the rescale are Gemma 4's (elsewhere identities); Gemma 4's MoE takes x itself (its
    dense MLP, router and experts each normalise it their own way)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.attention = attention_piece(cfg, layer)(cfg, layer)
        self.ffn_norm = nn.Identity() if cfg.expert_norms else RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.ffn = MoE(cfg, layer) if layer in cfg.moe_layers else DenseMLP(cfg.dim, cfg.dense_ffn_dim, cfg.dense_act)
        sandwich = (lambda: RMSNorm(cfg.dim, cfg.norm_eps)) if cfg.sandwich_norms else nn.Identity
        self.attention_out_norm, self.ffn_out_norm = sandwich(), sandwich()
        self.rescale = Scale() if cfg.sandwich_norms else nn.Identity()
        self.fused: cpu_attention.Fused | None = None  # a decode step's attention block in one call (`fuse`)

    def forward(self, x, cos, sin, cache, pos, experts: Experts) -> torch.Tensor:
        step = self.fused(x, cos, sin, [cache], [pos]) if self.fused is not None and x.shape[0] == 1 else None
        if step is None:
            x = x + self.attention_out_norm(self.attention(self.attention_norm(x), cos, sin, cache, pos))
            step = x, self.ffn_norm(x)
        x, h = step
        return self.rescale(x + self.ffn_out_norm(self.ffn(h, experts)))

    def fuse(self, rot_dim: int) -> bool:
        """On the CPU: a decode step's way from the attention norm to the MoE's input (one token, or one of each
        sequence of a batch) as one kernel call (`cpu_attention.Fused`), where it applies, Gemma 4's norm after
        the attention included; a linear-attention layer's from its input projection to out_proj
        (`LinearAttention.fuse`); whether it does."""
        if isinstance(self.attention, LinearAttention):
            return self.attention.fuse()
        if isinstance(self.attention, Attention):
            out_norm, ffn_norm = (None if isinstance(n, nn.Identity) else n for n in (self.attention_out_norm, self.ffn_norm))
            self.fused = cpu_attention.Fused.build(self.attention_norm, self.attention, out_norm, ffn_norm, rot_dim)
        return self.fused is not None

    def forward_batch(self, x, cos, sin, caches, positions, experts: Experts, pooled: Pooled | None = None) -> torch.Tensor:
        step = self.fused(x, cos, sin, caches, positions) if self.fused is not None else None
        if step is None:
            x = x + self.attention_out_norm(self.attention.forward_batch(self.attention_norm(x), cos, sin, caches, positions, pooled))
            step = x, self.ffn_norm(x)
        x, h = step
        return self.rescale(x + self.ffn_out_norm(self.ffn(h, experts)))

    def front(self, x, cos, sin, cache, pos: torch.Tensor) -> tuple:
        """A decode step's resident part of this layer, with static shapes (`forward_static`): a dense
        layer's whole output (x,); a MoE layer's (x after attention, the MoE input h, the router's logits,
        the shared expert's output or None), for `finish` to take on from."""
        x = x + self.attention_out_norm(self.attention.forward_static(self.attention_norm(x), cos, sin, cache, pos))
        h = self.ffn_norm(x)
        if not isinstance(self.ffn, MoE):
            return (self.rescale(x + self.ffn_out_norm(self.ffn(h))),)
        return x, h, self.ffn.router.logits(h), self.ffn.shared_out(h)

    def finish(self, x, h, logits, shared, experts: Experts) -> torch.Tensor:
        """A MoE layer's output from what `front` returned: the routed experts, the sums."""
        return self.rescale(x + self.ffn_out_norm(self.ffn.finish(h, logits, shared, experts)))


class KVCache:
    """Static per-layer attention caches for `ctx_size` tokens: keys and values [Hkv, ctx or window, hd]
    each, or with latent attention one [ctx, r + rope] tensor, or a linear-attention layer's fixed state
    (`LinearAttention.cache_shapes`): row `row` of `pool` (views of its tensors), or without one, the only
    row of a pool of its own."""

    def __init__(self, cfg: ModelConfig, ctx_size: int, dtype: torch.dtype, device: torch.device, pool: KVPool | None = None, row: int = 0):
        self.ctx_size, self.row = ctx_size, row
        self.pool = pool or KVPool(cfg, ctx_size, dtype, device, 1)
        self.layers = [tuple(t[row] for t in layer) for layer in self.pool.layers]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in layer)

    @property
    def can_truncate(self) -> bool:
        """Whether what the cache holds for a sequence also holds it for any prefix of that sequence (keys and
        values per position), so that a new prompt can resume after a shared prefix; not where a layer keeps
        a recurrent state of everything seen (linear attention): then only the whole cached sequence is."""
        return self.pool.can_truncate


class KVPool:
    """The KV caches of up to `rows` sequences decoded together (the server's `--parallel`), each layer's
    tensors with the sequence first [rows, ...], so that a decode step of several of them writes and reads
    all their keys and values with one operation each (`Attention._attend_pooled`). Each layer holds what
    its attention piece asks for (`cache_shapes`, `cache_dtypes`)."""

    def __init__(self, cfg: ModelConfig, ctx_size: int, dtype: torch.dtype, device: torch.device, rows: int):
        self.cfg, self.ctx_size, self.rows, self.dtype, self.device = cfg, ctx_size, rows, dtype, device
        kinds = [attention_piece(cfg, i) for i in range(cfg.n_layers)]
        self.layers = [
            tuple(torch.zeros((rows, *s), dtype=d, device=device) for s, d in zip(kind.cache_shapes(cfg, ctx_size, i), kind.cache_dtypes(dtype)))
            for i, kind in enumerate(kinds)
        ]
        self.can_truncate = not any(kind.recurrent for kind in kinds)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.layers for t in layer)

    def cache(self, row: int) -> KVCache:
        """Row `row`'s caches, as views."""
        return KVCache(self.cfg, self.ctx_size, self.dtype, self.device, pool=self, row=row)


@dataclass
class Pooled:
    """A decode step's sequences as rows of one `KVPool`, for one layer (`layer`: its pool tensors)."""

    layer: tuple[torch.Tensor, ...]
    rows: torch.Tensor  # [B] each sequence's row
    positions: torch.Tensor  # [B] the position of each sequence's new token
    lo: int  # the rows lo..lo+n-1 cover the batch
    n: int
    # [n, furthest position + 1]: row lo+i sees positions (or a ring's slots) up to its new token's; rows
    # outside the batch see position 0 only, and their results are dropped. The same for every layer: each
    # takes the first of its own cache's length.
    seen: torch.Tensor


class Transformer(nn.Module):
    """Everything but the routed experts, which live behind `experts`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # given its (uninitialised) weight: Embedding's own init, normal_ on the meta device, imports torch._dynamo
        # (3-4 s of every load on a busy 2-core machine; nothing else here needs it)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # one rotary per distinct RopeConfig of the layers (Gemma 4: the sliding layers' and the full ones'),
        # `rope_of[i]` layer i's; a decode step computes each table once
        self.ropes = list(dict.fromkeys(cfg.layer_rope(i) for i in range(cfg.n_layers)))
        self.rope_of = [self.ropes.index(cfg.layer_rope(i)) for i in range(cfg.n_layers)]
        with torch.device("cpu"):  # also when the model is built on the meta device, where arange imports torch._dynamo
            self.register_buffer("inv_freq", cfg.rope.inv_freq(), persistent=False)
            self.inv_freqs = [rope.inv_freq() for rope in self.ropes]
        source = None  # GLM-5.2: a shared indexer layer keeps what the last layer with an indexer kept
        for layer in self.layers:
            indexer = getattr(layer.attention, "indexer", None)
            if isinstance(indexer, SharedIndexer):
                indexer.source, source.followed = source, True
            elif indexer is not None:
                source = indexer

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> Transformer:
        """Built on the meta device and given `state`'s tensors as they are (no copy, no random init)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = cfg.rope.inv_freq().to(device)  # not in the state dict; computed on the CPU as the reference
        model.inv_freqs = [rope.inv_freq().to(device) for rope in model.ropes]
        for layer in model.layers:  # DeepSeek-V3.2's indexer weighs its heads in fp32, as transformers keeps it
            if isinstance(indexer := getattr(layer.attention, "indexer", None), Indexer):
                indexer.weights.weight = nn.Parameter(indexer.weights.weight.float(), requires_grad=False)
        for router in model.routers():
            if router.spec.fp32:  # GLM and DeepSeek route in fp32, from fp32 router weights
                router.weight = nn.Parameter(router.weight.float(), requires_grad=False)
            if router.correction_bias is not None:
                router.correction_bias = nn.Parameter(router.correction_bias.float(), requires_grad=False)
        return model

    def routers(self) -> list[Router]:
        """The MoE layers' routers, in order (index = the runtime's layer ordinal)."""
        return [layer.ffn.router for layer in self.layers if isinstance(layer.ffn, MoE)]

    def quantize_resident(self, dtype: str) -> None:
        """`--resident-dtype int8` or `int4`: the attention projections and the dense MLPs and shared experts
        (most of the resident weights; not routers, norms or the shared experts' gates) as int8 with one scale
        per output channel, or int4 in groups (`int4.group_for` the attention's shapes, and the MLPs' apart: a
        dense MLP's width may take only smaller groups), and on the CPU lm_head in int8
        (`budget.lm_head_quantized`), quantized on their device, one matrix at a time."""
        device_type = self.norm.weight.device.type
        if dtype == "int4":
            attention = functools.partial(Int4Linear.from_linear, group=int4.group_for(self.cfg.projection_shapes, device_type))
            mlp = functools.partial(Int4Linear.from_linear, group=int4.group_for(self.cfg.mlp_shapes, device_type))
        else:
            attention = mlp = Int8Linear.from_linear
        for layer in self.layers:
            layer.attention.quantize(attention)
        for module in list(self.modules()):
            if isinstance(module, DenseMLP):  # a dense layer's, a shared expert, Gemma 4's inside its NormedMLP
                module.quantize(mlp)
        if lm_head_quantized(self.cfg, device_type, dtype):
            self.output = Int8Linear.from_linear(self.output)

    def widen_prefill(self) -> int:
        """On the CPU, where it lacks bf16 arithmetic (`cpu_matmul.widens_bf16`): each bf16 `nn.Linear` left
        (projections, dense and shared MLPs, lm_head) as a `cpu_matmul.WideLinear`, whose prefill products run in
        fp32; how many."""
        if not cpu_matmul.widens_bf16():
            return 0
        wide = 0
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
                    setattr(module, name, WideLinear.of(child))
                    wide += 1
        return wide

    def fuse_decode(self) -> int:
        """On the CPU, after any quantization: each layer's attention block as one kernel call for a decode
        token (`Block.fuse`), and each resident MLP (`DenseMLP.fuse`); how many layers' attention blocks take it."""
        for module in list(self.modules()):
            if isinstance(module, DenseMLP):  # a dense layer's, a shared expert, Gemma 4's inside its NormedMLP
                module.fuse()
        return sum(layer.fuse(2 * self.inv_freqs[self.rope_of[i]].numel()) for i, layer in enumerate(self.layers))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] (on any device) -> [T, D] on the compute device, wherever the table lies (beside a GPU, in
        host RAM: `budget.embeddings_on_host`); times the family's scale (Gemma 4's sqrt(D), in the table's
        dtype as transformers rounds it)."""
        table = self.tok_embeddings.weight
        x = F.embedding(tokens.to(table.device), table).to(self.norm.weight.device)
        return x if self.cfg.embed_scale == 1.0 else x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) [T, rd] of each of `ropes` at `positions` [T]."""
        return [rope_cos_sin(f, positions, dtype, rope.attention_factor) for f, rope in zip(self.inv_freqs, self.ropes)]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, D] -> logits [T, V], soft-capped where the family caps them (Gemma 4)."""
        logits = cpu_matmul.rows_linear(hidden, self.output.weight) if type(self.output) in (nn.Linear, WideLinear) else None
        logits = logits if logits is not None else self.output(hidden)  # [T, V]
        cap = self.cfg.logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def forward(self, tokens: torch.Tensor, pos: int, kv: KVCache, experts: Experts) -> torch.Tensor:
        """tokens [T] at positions pos..pos+T-1 -> final hidden states [T, D] (before lm_head)."""
        T = tokens.shape[0]
        x = self.embed(tokens)  # [T, D]
        tables = self.rope_tables(torch.arange(pos, pos + T, device=x.device), x.dtype)  # cos, sin [T, rd]
        for i, layer in enumerate(self.layers):
            x = layer(x, *tables[self.rope_of[i]], kv.layers[i], pos, experts)
        return self.norm(x)

    def forward_batch(self, tokens: torch.Tensor, positions: list[int], caches: list[KVCache], experts: Experts) -> torch.Tensor:
        """One decode step of B sequences: tokens [B], token b at positions[b] of the sequence whose cache is
        caches[b] -> final hidden states [B, D]. Everything but the attention core runs on the B rows at once,
        so each MoE layer asks `experts` once for all of them; the core too when the caches share a pool."""
        x = self.embed(tokens)  # [B, D]
        at = torch.tensor(positions, device=x.device)
        tables = self.rope_tables(at, x.dtype)  # cos, sin [B, rd]
        pool, pooled = caches[0].pool, None
        if all(kv.pool is pool for kv in caches):
            row_ids = [kv.row for kv in caches]
            lo, n = min(row_ids), max(row_ids) - min(row_ids) + 1
            rows = torch.tensor(row_ids, device=x.device)
            limit = torch.zeros(n, dtype=at.dtype, device=x.device)
            limit[rows - lo] = at
            seen = torch.arange(max(positions) + 1, device=x.device)[None, :] <= limit[:, None]
            pooled = Pooled((), rows, at, lo, n, seen)
        for i, layer in enumerate(self.layers):
            step = None if pooled is None else replace(pooled, layer=pool.layers[i])
            x = layer.forward_batch(x, *tables[self.rope_of[i]], [kv.layers[i] for kv in caches], positions, experts, step)
        return self.norm(x)

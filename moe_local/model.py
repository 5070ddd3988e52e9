"""The transformer in plain PyTorch: RMSNorm, RoPE, GQA attention over a static KV cache, and a MoE
block that asks an expert runtime (`experts(layer, x, weights, indices) -> y`) for its output."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moe_local.config import ModelConfig
from moe_local.int8 import Int8Linear
from moe_local.routing import route


class Experts(Protocol):
    """What the MoE block needs: the weighted sum of each token's chosen experts."""

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, then scale in the compute dtype, as the reference does (one fused op, same bits).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [T, hd] and the signed sin [T, hd] (first half negated) that `apply_rope` takes."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    sin = emb.sin().to(dtype)
    sin[:, : freqs.shape[1]].neg_()
    return emb.cos().to(dtype), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [H, T, hd]. Rotates the two halves of each head (the Hugging Face weight layout): the
    reference's x * cos + cat(-x2, x1) * sin, bit for bit, as x * cos + cat(x2, x1) * cat(-sin, sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class KVCache(nn.Module):
    """Static key/value buffers for every layer: [L, Hkv, ctx, hd] each."""

    def __init__(self, cfg: ModelConfig, ctx_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (cfg.n_layers, cfg.n_kv_heads, ctx_size, cfg.head_dim)
        self.ctx_size = ctx_size
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q, k and v projections as one matrix (rows: q heads, k heads, v heads): one matmul, not three
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache, pos: int, mask) -> torch.Tensor:
        T, H, Hkv = x.shape[0], self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(T, H + 2 * Hkv, self.head_dim).transpose(0, 1)  # [H + 2Hkv, T, hd]
        q, k = apply_rope(qkv[: H + Hkv], cos, sin).split([H, Hkv])  # [H, T, hd], [Hkv, T, hd]
        k_cache[:, pos : pos + T] = k
        v_cache[:, pos : pos + T] = qkv[H + Hkv :]
        keys, values = k_cache[:, : pos + T], v_cache[:, : pos + T]  # [Hkv, S, hd]
        if mask is None:  # a decode step: SDPA shares each KV head among its query heads itself
            y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)  # [H, T, hd]
        else:  # with a mask, enable_gqa sends CUDA to the math kernel: share the heads by hand
            groups = H // Hkv
            keys, values = keys.repeat_interleave(groups, dim=0), values.repeat_interleave(groups, dim=0)  # [H, S, hd]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [H, T, hd]
        return self.wo(y.transpose(0, 1).reshape(T, -1))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.top_k = layer, cfg.top_k
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)

    def forward(self, x: torch.Tensor, experts: Experts) -> torch.Tensor:
        weights, indices = route(self.gate(x), self.top_k)  # [T, k], [T, k]
        return experts(self.layer, x, weights, indices)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = MoE(cfg, layer)

    def forward(self, x, cos, sin, k_cache, v_cache, pos, mask, experts: Experts) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, pos, mask)
        return x + self.moe(self.ffn_norm(x), experts)


class Transformer(nn.Module):
    """Everything but the experts, which live behind `experts`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> Transformer:
        """Built on the meta device and given `state`'s tensors as they are (no copy, no random init)."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = model.rope_inv_freq(device)  # not in the state dict
        return model

    def quantize_attention(self) -> None:
        """`--resident-dtype int8`: the attention projections (most of the resident weights) as int8 with
        one scale per output channel, quantized on their device, one matrix at a time."""
        for layer in self.layers:
            layer.attention.wqkv = Int8Linear(layer.attention.wqkv.weight)
            layer.attention.wo = Int8Linear(layer.attention.wo.weight)

    def rope_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        # computed on the CPU, then moved, as the reference does, so positions rotate identically
        hd = self.cfg.head_dim
        return (1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device="cpu") / hd))).to(device)

    def mask(self, pos: int, T: int, device: torch.device) -> torch.Tensor | None:
        """[T, pos+T] bool: query i (at position pos+i) sees keys at positions <= pos+i, within the window;
        None when every query sees every key (one decode step inside the window)."""
        if T == 1 and (not self.cfg.sliding_window or pos < self.cfg.sliding_window):
            return None
        q_pos = torch.arange(pos, pos + T, device=device)[:, None]
        k_pos = torch.arange(pos + T, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.cfg.sliding_window:
            allowed &= k_pos > q_pos - self.cfg.sliding_window
        return allowed

    def forward(self, tokens: torch.Tensor, pos: int, kv: KVCache, experts: Experts) -> torch.Tensor:
        """tokens [T] at positions pos..pos+T-1 -> final hidden states [T, D] (before lm_head)."""
        T = tokens.shape[0]
        x = self.tok_embeddings(tokens)  # [T, D]
        positions = torch.arange(pos, pos + T, device=tokens.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # [T, hd]
        mask = self.mask(pos, T, tokens.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv.k[i], kv.v[i], pos, mask, experts)
        return self.norm(x)

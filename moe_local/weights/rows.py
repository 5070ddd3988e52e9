"""Reorderings of a checkpoint's rows into the layout our model computes with, each a function of one tensor
(`transform`), shared by safetensors checkpoints (`checkpoint.py`) and GGUF files (`gguf_model.py`)."""

from __future__ import annotations

from typing import Callable

import torch


def deinterleave_rope(rows: int, rope: int, first: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reorder the last (or with `first`, the first) `rope` of every `rows` rows (or entries) from interleaved
    pairs (x0, x1), (x2, x3) to halves (x0, x2, ...), (x1, x3, ...): DeepSeek's rotary layout becomes the one
    `apply_rope` rotates. Queries and keys are reordered alike, so their dot products do not change."""
    order, at = torch.arange(rows), 0 if first else rows - rope
    order[at : at + rope] = at + torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])

    def transform(w: torch.Tensor) -> torch.Tensor:
        return w.view(-1, rows, *w.shape[1:])[:, order].reshape(w.shape)

    return transform


def ungate_rows(heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gated q projection's rows (or bias) from per head [query, gate] to all queries, then all gates."""
    def transform(w: torch.Tensor) -> torch.Tensor:
        return w.view(heads, 2, head_dim, *w.shape[1:]).transpose(0, 1).reshape(w.shape)

    return transform


def qkvz_rows(lin) -> Callable[[torch.Tensor], torch.Tensor]:
    """Qwen3-Next's fused in_proj_qkvz groups its rows by key head: [Hk, (q dk, k dk, v g dv, z g dv)] with
    g = Hv / Hk value heads a key head; ours are q | k | v | z, each head-major (Qwen3.5's split layout)."""
    g = lin.v_heads // lin.k_heads
    sizes = [lin.k_head_dim, lin.k_head_dim, g * lin.v_head_dim, g * lin.v_head_dim]

    def transform(w: torch.Tensor) -> torch.Tensor:
        parts = w.view(lin.k_heads, sum(sizes), -1).split(sizes, dim=1)
        return torch.cat([p.reshape(-1, w.shape[1]) for p in parts])

    return transform


def ba_rows(lin) -> Callable[[torch.Tensor], torch.Tensor]:
    """Qwen3-Next's fused in_proj_ba: [Hk, (b g, a g)] -> b | a, each per value head."""
    g = lin.v_heads // lin.k_heads

    def transform(w: torch.Tensor) -> torch.Tensor:
        b, a = w.view(lin.k_heads, 2 * g, -1).split([g, g], dim=1)
        return torch.cat([b.reshape(-1, w.shape[1]), a.reshape(-1, w.shape[1])])

    return transform

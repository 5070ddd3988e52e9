"""Routing: which experts each token uses and with what weight, as one pure fp32 function."""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, keep the top k, optionally renormalise them to sum to 1.

    logits: [T, E] router logits. Returns weights [T, k] (fp32) and indices [T, k] (int64).
    Mixtral renormalises; the parameter is here for the families that do not.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, indices = torch.topk(probs, k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices

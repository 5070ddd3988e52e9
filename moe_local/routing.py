"""Routing: which experts each token uses and with what weight, as one pure fp32 function of the router
logits and the family's `RouterConfig`."""

from __future__ import annotations

import torch

from moe_local.config import RouterConfig

SOFTMAX = RouterConfig()  # Mixtral's: softmax, top-k, renormalised


def route(
    logits: torch.Tensor, k: int, router: RouterConfig = SOFTMAX, correction_bias: torch.Tensor | None = None,
    expert_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> weights [T, k] (fp32), indices [T, k] (int64).

    Scores are the softmax or sigmoid of the logits; the experts are chosen by the scores (plus the
    correction bias, where the family has one) among the best `topk_group` groups; the weights are the
    chosen experts' scores, renormalised or not, times `scaling` (and, where the family learns one per
    expert, Gemma 4, times each chosen expert's scale)."""
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if router.scoring == "softmax" else logits.sigmoid()  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if router.n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, router.n_group, E // router.n_group)  # [T, G, E/G]
        if router.group_score == "top2":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.amax(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, True)
        # the reference masks excluded experts with -inf (sigmoid) or 0 (softmax, all scores positive)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
    indices = torch.topk(choice, k, dim=-1).indices  # [T, k], best first
    weights = scores.gather(1, indices)
    if router.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if router.scoring == "sigmoid" else 0.0))
    if router.scaling != 1.0:
        weights = weights * router.scaling
    if expert_scale is not None:
        weights = weights * expert_scale[indices]
    return weights, indices

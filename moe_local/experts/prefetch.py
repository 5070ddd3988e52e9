"""`Prefetcher`: guesses layer l+1's experts by applying layer l+1's router to layer l's MoE input,
so their copies can start while layer l still computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Prefetcher:
    def __init__(self, gates: list[torch.Tensor], top_k: int, per_token: int | None = None):
        self.gates, self.top_k = gates, top_k  # gates[l]: [E, D], the routers' weights
        self.per_token = min(per_token or top_k, top_k)  # load only each token's likeliest few

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, D] -> predicted expert indices [T, per_token] for layer+1 (None after the last layer)."""
        if layer + 1 >= len(self.gates):
            return None
        # the router's top experts, likeliest first (softmax keeps the order, so it is not needed here)
        return torch.topk(F.linear(x, self.gates[layer + 1]), self.per_token, dim=-1).indices

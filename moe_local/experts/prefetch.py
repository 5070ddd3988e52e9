"""`Prefetcher`: guesses MoE layer l+1's experts by applying layer l+1's router to layer l's MoE input,
so their copies can start while layer l still computes."""

from __future__ import annotations

import torch

from moe_local.model import Router


class Prefetcher:
    def __init__(self, routers: list[Router], top_k: int, per_token: int | None = None):
        self.routers, self.top_k = routers, top_k  # routers[l]: MoE layer l's (by ordinal)
        self.per_token = min(per_token or top_k, top_k)  # load only each token's likeliest few

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, D] -> predicted expert indices [T, per_token] for layer+1 (None after the last layer)."""
        if layer + 1 >= len(self.routers):
            return None
        return self.routers[layer + 1].likeliest(x, self.per_token)

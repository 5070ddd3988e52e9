"""`ExpertStore`: every expert in host memory, one contiguous buffer each (pinned when the device is CUDA),
so that moving an expert to the device is a single copy."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from moe_local.budget import check_host_ram
from moe_local.config import ModelConfig

Key = tuple[int, int]  # (layer, expert)


def unpack(buffer: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's buffer -> gate_up [2F, D] (w1 rows then w3 rows), down [D, F] (w2).

    w1 and w3 sit side by side so the expert runs two matmuls, not three.
    """
    split = 2 * cfg.ffn_dim * cfg.dim
    return buffer[:split].view(2 * cfg.ffn_dim, cfg.dim), buffer[split:].view(cfg.dim, cfg.ffn_dim)


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x [N, D] -> [N, D]."""
    gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)  # [N, F] each
    return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)


class ExpertStore:
    """All experts of all layers in host RAM, allocated one layer at a time (a chunk per layer)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, pin: bool, extra_host_bytes: int = 0):
        self.cfg, self.dtype = cfg, dtype
        self.expert_bytes = cfg.expert_numel * dtype.itemsize
        self.total_bytes = self.expert_bytes * cfg.n_experts * cfg.n_layers
        check_host_ram(self.total_bytes + extra_host_bytes, "the experts (and, on the CPU, the rest of the model)")
        self.pinned = pin
        self.layers: list[torch.Tensor] = []
        for _ in range(cfg.n_layers):
            self.layers.append(self._allocate((cfg.n_experts, cfg.expert_numel)))  # [E, numel]

    def _allocate(self, shape: tuple[int, int]) -> torch.Tensor:
        if self.pinned:
            try:
                return torch.empty(shape, dtype=self.dtype, pin_memory=True)
            except RuntimeError as e:
                # Pinning can fail (locked-memory limits, fragmentation); pageable memory still works,
                # only its copies are slower and not asynchronous: say so once, and in the stats.
                warnings.warn(f"could not pin host memory for experts ({e}); using pageable memory, copies will be slower")
                self.pinned = False
        return torch.empty(shape, dtype=self.dtype)

    def buffer(self, key: Key) -> torch.Tensor:
        layer, expert = key
        return self.layers[layer][expert]  # [numel], contiguous

    def fill_expert(self, key: Key, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> None:
        gate_up, down = unpack(self.buffer(key), self.cfg)
        f = self.cfg.ffn_dim
        gate_up[:f].copy_(w1)
        gate_up[f:].copy_(w3)
        down.copy_(w2)

    def fill(
        self, read: Callable[[int, int, str], torch.Tensor], progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Fill every expert from `read(layer, expert, "w1"|"w2"|"w3")`, one expert at a time, so that
        at most one expert's checkpoint tensors are in memory beside the store; `progress(done_bytes,
        total_bytes)` after each."""
        done = 0
        for layer in range(self.cfg.n_layers):
            for expert in range(self.cfg.n_experts):
                self.fill_expert((layer, expert), *(read(layer, expert, w) for w in ("w1", "w2", "w3")))
                done += self.expert_bytes
                if progress:
                    progress(done, self.total_bytes)

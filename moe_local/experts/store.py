"""`ExpertStore`: every expert in host memory, one contiguous buffer each (pinned when the device is CUDA),
so that moving an expert to the device is a single copy."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from moe_local.budget import check_host_ram, format_bytes
from moe_local.config import ModelConfig

Key = tuple[int, int]  # (layer, expert)
CHUNK_BYTES = 2**30


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
    """All experts of all layers in host RAM, one contiguous buffer each, allocated in chunks of about
    `chunk_bytes` as `fill` reaches them (one huge pinned allocation fails on many machines, and pinning
    takes ~0.5 s per GiB, so it belongs under the progress bar)."""

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, pin: bool, extra_host_bytes: int = 0, chunk_bytes: int = CHUNK_BYTES
    ):
        self.cfg, self.dtype, self.pin = cfg, dtype, pin
        self.expert_bytes = cfg.expert_numel * dtype.itemsize
        self.count = cfg.n_experts * cfg.n_layers
        self.total_bytes = self.expert_bytes * self.count
        check_host_ram(self.total_bytes + extra_host_bytes, "the experts (and, on the CPU, the rest of the model)")
        self.per_chunk = max(1, chunk_bytes // self.expert_bytes)  # experts per chunk
        self.chunks: list[torch.Tensor] = []  # [n, numel] each; experts in (layer, expert) order
        self.pinned_experts = 0  # the first this many experts are in pinned chunks

    @property
    def pinned(self) -> bool:
        return self.pinned_experts == self.count

    def memory(self) -> dict:
        pinned = self.pinned_experts * self.expert_bytes
        return {"pinned_bytes": pinned, "pageable_bytes": self.total_bytes - pinned, "chunks": len(self.chunks)}

    def _allocate_chunk(self) -> None:
        n = min(self.per_chunk, self.count - len(self.chunks) * self.per_chunk)
        shape = (n, self.cfg.expert_numel)
        if self.pin:
            try:
                self.chunks.append(torch.empty(shape, dtype=self.dtype, pin_memory=True))
                self.pinned_experts += n
                return
            except RuntimeError as e:
                # Pinning can fail (locked-memory limits, fragmentation, no driver); pageable memory still
                # works, only its copies are slower and not asynchronous: say so once, and in the stats.
                pinned = format_bytes(self.pinned_experts * self.expert_bytes)
                warnings.warn(
                    f"could not pin host memory for the experts after {pinned} ({str(e).splitlines()[0]}); "
                    "the rest is pageable, so its copies to the GPU are slower and synchronous"
                )
                self.pin = False
        self.chunks.append(torch.empty(shape, dtype=self.dtype))

    def index(self, key: Key) -> int:
        layer, expert = key
        return layer * self.cfg.n_experts + expert

    def is_pinned(self, key: Key) -> bool:
        return self.index(key) < self.pinned_experts

    def buffer(self, key: Key) -> torch.Tensor:
        chunk, row = divmod(self.index(key), self.per_chunk)
        return self.chunks[chunk][row]  # [numel], contiguous

    def fill_expert(self, key: Key, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> None:
        gate_up, down = unpack(self.buffer(key), self.cfg)
        f = self.cfg.ffn_dim
        gate_up[:f].copy_(w1)
        gate_up[f:].copy_(w3)
        down.copy_(w2)

    def fill(
        self, read: Callable[[int, int, str], torch.Tensor], progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Allocate the chunks and fill every expert from `read(layer, expert, "w1"|"w2"|"w3")` (a tensor on
        any device), one expert at a time, so that at most one expert's source tensors exist beside the
        store; `progress(done_bytes, total_bytes)` after each."""
        for i in range(self.count):
            if i == len(self.chunks) * self.per_chunk:
                self._allocate_chunk()
            layer, expert = divmod(i, self.cfg.n_experts)
            self.fill_expert((layer, expert), *(read(layer, expert, w) for w in ("w1", "w2", "w3")))
            if progress:
                progress((i + 1) * self.expert_bytes, self.total_bytes)

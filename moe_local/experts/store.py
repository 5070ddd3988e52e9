"""`ExpertStore`: every expert in host memory, one contiguous byte buffer each in its `ExpertFormat` (pinned
when the device is CUDA), so that moving an expert to the device is a single copy."""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from moe_local.budget import check_host_ram, format_bytes
from moe_local.config import ModelConfig
from moe_local.experts.formats import ExpertFormat

Key = tuple[int, int]  # (layer, expert)
CHUNK_BYTES = 2**30


class ExpertStore:
    """All experts of all layers in host RAM, one contiguous buffer each, allocated in chunks of about
    `chunk_bytes` as `fill` reaches them (one huge pinned allocation fails on many machines, and pinning
    takes ~0.5 s per GiB, so it belongs under the progress bar)."""

    def __init__(
        self, cfg: ModelConfig, fmt: ExpertFormat, pin: bool, extra_host_bytes: int = 0, chunk_bytes: int = CHUNK_BYTES
    ):
        self.cfg, self.format, self.pin = cfg, fmt, pin
        self.expert_bytes = fmt.expert_bytes
        self.count = cfg.n_experts * cfg.n_moe_layers
        self.total_bytes = self.expert_bytes * self.count
        check_host_ram(self.total_bytes + extra_host_bytes, "the experts (and, on the CPU, the rest of the model)")
        self.per_chunk = max(1, chunk_bytes // self.expert_bytes)  # experts per chunk
        self.chunks: list[torch.Tensor] = []  # uint8 [n, expert_bytes] each; experts in (layer, expert) order
        self.pinned_experts = 0  # the first this many experts are in pinned chunks

    @property
    def pinned(self) -> bool:
        return self.pinned_experts == self.count

    def memory(self) -> dict:
        pinned = self.pinned_experts * self.expert_bytes
        return {"pinned_bytes": pinned, "pageable_bytes": self.total_bytes - pinned, "chunks": len(self.chunks)}

    def _allocate_chunk(self) -> None:
        n = min(self.per_chunk, self.count - len(self.chunks) * self.per_chunk)
        shape = (n, self.expert_bytes)
        if self.pin:
            try:
                self.chunks.append(torch.empty(shape, dtype=torch.uint8, pin_memory=True))
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
        self.chunks.append(torch.empty(shape, dtype=torch.uint8))

    def index(self, key: Key) -> int:
        layer, expert = key
        return layer * self.cfg.n_experts + expert

    def is_pinned(self, key: Key) -> bool:
        return self.index(key) < self.pinned_experts

    def buffer(self, key: Key) -> torch.Tensor:
        chunk, row = divmod(self.index(key), self.per_chunk)
        return self.chunks[chunk][row]  # [numel], contiguous

    def keys(self) -> list[Key]:
        return [divmod(i, self.cfg.n_experts) for i in range(self.count)]

    def fill(self, write: Callable[[Key, torch.Tensor], None], progress: Callable[[int, int], None] | None = None) -> None:
        """Allocate the chunks and let `write(key, buffer)` fill each expert's uint8 buffer, one expert at a
        time in (layer, expert) order; `progress(done_bytes, total_bytes)` after each."""
        for i, key in enumerate(self.keys()):
            if i // self.per_chunk == len(self.chunks):
                self._allocate_chunk()
            write(key, self.buffer(key))
            if progress:
                progress((i + 1) * self.expert_bytes, self.total_bytes)

    def packer(self, read: Callable[[int, int, str], torch.Tensor], device: torch.device) -> Callable[[Key, torch.Tensor], None]:
        """A `fill` writer that packs each expert from `read(layer, expert, "w1"|"w2"|"w3")` (a tensor on any
        device; and "b1"|"b2"|"b3", the biases, for a family that has them), quantizing on `device` when the
        format is quantized."""

        def write(key: Key, buffer: torch.Tensor) -> None:
            if self.format.pack_native(lambda name: read(*key, name), buffer):
                return
            w1, w2, w3 = (read(*key, w) for w in ("w1", "w2", "w3"))
            if self.format.quantized:
                w1, w2, w3 = w1.to(device), w2.to(device), w3.to(device)
            biases = tuple(read(*key, b) for b in ("b1", "b2", "b3")) if self.cfg.expert_bias else None
            self.format.pack(w1, w2, w3, buffer, biases)

        return write

    def fill_from(
        self,
        read: Callable[[int, int, str], torch.Tensor],
        device: torch.device,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Fill every expert from the checkpoint's matrices, one expert at a time, so that at most one
        expert's source matrices exist beside the store."""
        self.fill(self.packer(read, device), progress)

"""`ExpertCache`: a fixed pool of device slots holding copies of experts, filled on demand from the
`ExpertStore` on a side CUDA stream, with an eviction policy choosing which slot to reuse.

On CUDA, ordering is kept with events, never device-wide syncs: a slot's copy waits for the event
recorded after the last computation that read the slot, and a computation waits for the event
recorded after the slot's copy. On the CPU the same code runs with plain synchronous copies."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch

from moe_local.experts.store import ExpertStore, Key, unpack


class EvictionPolicy(Protocol):
    """Tracks the resident keys and picks which one to give up."""

    def insert(self, key: Key) -> None: ...
    def touch(self, key: Key) -> None: ...
    def evict(self, protected: set[Key]) -> Key | None: ...


class LRUPolicy:
    """Evict the expert used longest ago (one order across all layers)."""

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def insert(self, key: Key) -> None:
        self.order[key] = None

    def touch(self, key: Key) -> None:
        self.order.move_to_end(key)

    def evict(self, protected: set[Key]) -> Key | None:
        for key in self.order:
            if key not in protected:
                del self.order[key]
                return key
        return None


POLICIES = {"lru": LRUPolicy}


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy: EvictionPolicy):
        self.store, self.device, self.policy = store, device, policy
        self.num_slots = num_slots
        self.slots = torch.empty((num_slots, store.cfg.expert_numel), dtype=store.dtype, device=device)  # [S, numel]
        self.slot_of: dict[Key, int] = {}
        self.free = list(range(num_slots - 1, -1, -1))
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: dict[int, torch.cuda.Event] = {}  # slot -> its last copy is done
        self.released: dict[int, torch.cuda.Event] = {}  # slot -> the last computation reading it is done

    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    def load(self, key: Key, protected: set[Key]) -> bool:
        """Make `key` resident, evicting an unprotected expert if the pool is full. Asynchronous on CUDA.
        Returns False when every slot holds a protected expert."""
        if key in self.slot_of:
            return True
        if self.free:
            slot = self.free.pop()
        else:
            victim = self.policy.evict(protected)
            if victim is None:
                return False
            slot = self.slot_of.pop(victim)
        self._copy_into(slot, key)
        self.slot_of[key] = slot
        self.policy.insert(key)
        return True

    def _copy_into(self, slot: int, key: Key) -> None:
        source = self.store.buffer(key)
        if not self.cuda:
            self.slots[slot].copy_(source)
            return
        with torch.cuda.stream(self.copy_stream):
            if slot in self.released:
                self.copy_stream.wait_event(self.released.pop(slot))
            self.slots[slot].copy_(source, non_blocking=self.store.is_pinned(key))
            self.copied[slot] = self.copy_stream.record_event()

    def acquire(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """The resident expert's weights, ready to use on the current stream: gate_up [2F, D], down [D, F]."""
        slot = self.slot_of[key]
        self.policy.touch(key)
        if self.cuda and slot in self.copied:
            torch.cuda.current_stream(self.device).wait_event(self.copied.pop(slot))
        return unpack(self.slots[slot], self.store.cfg)

    def release(self, key: Key) -> None:
        """The current stream has queued its last use of `key` for now; a later copy into its slot must wait."""
        if self.cuda:
            self.released[self.slot_of[key]] = torch.cuda.current_stream(self.device).record_event()

"""`ExpertCache`: a fixed pool of device slots holding copies of experts, filled on demand from the
`ExpertStore` on a side CUDA stream, with an eviction policy choosing which slot to reuse.

On CUDA, ordering is kept with events, never device-wide syncs: a slot's copy waits for the event
recorded after the last computation that read the slot, and a computation waits for the event
recorded after the slot's copy. On the CPU the same code runs with plain synchronous copies."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch

from moe_local.experts.formats import Weights
from moe_local.experts.store import ExpertStore, Key


class EvictionPolicy(Protocol):
    """Tracks the resident keys and picks which one to give up to make room for `incoming`."""

    def insert(self, key: Key) -> None: ...
    def touch(self, key: Key) -> None: ...
    def evict(self, protected: set[Key], incoming: Key) -> Key | None: ...


class LRUPolicy:
    """Evict the expert used longest ago, in one order across all layers."""

    def __init__(self, num_slots: int, n_layers: int) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def insert(self, key: Key) -> None:
        self.order[key] = None

    def touch(self, key: Key) -> None:
        self.order.move_to_end(key)

    def evict(self, protected: set[Key], incoming: Key) -> Key | None:
        return pop_oldest(self.order, protected)


class LayerLRUPolicy:
    """Each layer keeps an even share of the slots, LRU within the layer (as mixtral-offloading does).

    Decoding walks the layers in a cycle; when the pool holds less than one token's worth of experts,
    a global LRU evicts exactly the experts of the layers coming next, so under uniform routing it hits
    less than the share a layer could keep (slots / all experts). Here a layer at or over its share gives
    up its own least recently used expert; otherwise the layer furthest over its share pays."""

    def __init__(self, num_slots: int, n_layers: int) -> None:
        self.share = [num_slots // n_layers + (layer < num_slots % n_layers) for layer in range(n_layers)]
        self.orders: list[OrderedDict[Key, None]] = [OrderedDict() for _ in range(n_layers)]  # oldest first

    def insert(self, key: Key) -> None:
        self.orders[key[0]][key] = None

    def touch(self, key: Key) -> None:
        self.orders[key[0]].move_to_end(key)

    def evict(self, protected: set[Key], incoming: Key) -> Key | None:
        def over(layer: int) -> int:
            return len(self.orders[layer]) - self.share[layer]

        if over(incoming[0]) >= 0:
            key = pop_oldest(self.orders[incoming[0]], protected)
            if key is not None:
                return key
        for layer in sorted(range(len(self.orders)), key=over, reverse=True):
            key = pop_oldest(self.orders[layer], protected)
            if key is not None:
                return key
        return None


def pop_oldest(order: OrderedDict[Key, None], protected: set[Key]) -> Key | None:
    for key in order:
        if key not in protected:
            del order[key]
            return key
    return None


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "layer-lru": LayerLRUPolicy}


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy: EvictionPolicy):
        self.store, self.device, self.policy = store, device, policy
        self.num_slots = num_slots
        self.slots = torch.empty((num_slots, store.expert_bytes), dtype=torch.uint8, device=device)  # [S, bytes]
        self.views = [store.format.unpack(slot) for slot in self.slots]  # each slot's parts, made once
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
            victim = self.policy.evict(protected, key)
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

    def acquire(self, key: Key) -> Weights:
        """The resident expert's weights (views into its slot), ready to use on the current stream."""
        return self.views[self.acquire_slot(key)]

    def acquire_slot(self, key: Key) -> int:
        """The resident expert's slot (a row of `slots`), ready to use on the current stream."""
        slot = self.slot_of[key]
        self.policy.touch(key)
        if self.cuda and slot in self.copied:
            torch.cuda.current_stream(self.device).wait_event(self.copied.pop(slot))
        return slot

    def release(self, key: Key) -> None:
        """The current stream has queued its last use of `key` for now; a later copy into its slot must wait."""
        if self.cuda:
            self.released[self.slot_of[key]] = torch.cuda.current_stream(self.device).record_event()

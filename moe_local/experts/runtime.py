"""The expert runtime the MoE block calls: `experts(layer, x, weights, indices) -> y`.

`OffloadedExperts` serves experts from the `ExpertCache` (hits first, while misses are still copying),
sends the misses that finish sooner there to the CPU channel (`experts/cpu.py`), and asks the `Prefetcher`
for the next layer; `InPlaceExperts` runs every expert from the store where the device is the CPU;
`ResidentExperts` keeps every expert on the device and is the reference the others must match exactly."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from moe_local.cpu_matmul import matmuls_for_rows
from moe_local.experts.cache import ExpertCache
from moe_local.experts.cpu import CPU, ChannelSpeeds, CpuChannel, place
from moe_local.experts.prefetch import Prefetcher
from moe_local.experts.store import ExpertStore, Key


@dataclass
class LayerStats:
    hits: int = 0  # requested experts already resident (or in flight) when asked for
    misses: int = 0
    prefetched: int = 0  # copies started by the prefetcher
    prefetch_hits: int = 0  # hits on experts that the prefetcher had loaded
    predicted_right: int = 0  # requested experts the prefetcher had predicted ...
    predicted_of: int = 0  # ... out of the requested experts of layers that had a prediction
    bytes_copied: int = 0  # host -> device, misses and prefetches
    on_cpu: int = 0  # misses run on the CPU channel instead of copied
    in_place: int = 0  # experts run where they lie in host RAM (`InPlaceExperts`): no slot was looked up, neither hit nor miss


class ExpertStats:
    def __init__(self, n_layers: int, host_memory: dict | None = None, slots: bool = True):
        self.layers = [LayerStats() for _ in range(n_layers)]
        self.slots = slots  # False: every expert runs in place, there is no cache and so no hit rate
        self.host_memory = host_memory or {}  # the store's pinned and pageable bytes
        # Host time spent blocked on the device at the layers' routing syncs: near 0 means the host (Python
        # and kernel launches) is what limits the speed, not the copies or the device.
        self.sync_wait_s = 0.0
        self.cpu_busy_s = 0.0  # the CPU channel's compute time
        self.cpu_wait_s = 0.0  # of which the main thread sat waiting for its results

    def reset(self) -> None:
        self.layers = [LayerStats() for _ in self.layers]
        self.sync_wait_s = self.cpu_busy_s = self.cpu_wait_s = 0.0

    def total(self) -> LayerStats:
        total = LayerStats()
        for layer in self.layers:
            for f in fields(LayerStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(layer, f.name))
        return total

    def as_dict(self) -> dict:
        t = self.total()
        return {
            **asdict(t),
            "hit_rate": t.hits / max(1, t.hits + t.misses) if self.slots else None,
            "prefetch_recall": t.predicted_right / t.predicted_of if t.predicted_of else None,
            "experts_on_cpu": t.on_cpu,
            "sync_wait_s": self.sync_wait_s,
            "cpu_busy_s": self.cpu_busy_s,
            "cpu_wait_s": self.cpu_wait_s,
            "host_memory": self.host_memory,
            "per_layer": [asdict(layer) for layer in self.layers],
        }


def weigh(rows: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One token's k expert outputs rows [k, D], in choice order, times its weights [1, k] fp32, summed -> [1, D]
    in `dtype`: the one way a decode token's experts are combined, whichever path ran them."""
    return (rows * weights.view(-1, 1)).to(dtype).sum(dim=0, keepdim=True)


def mix(
    x: torch.Tensor,
    weights: torch.Tensor,
    chosen: list[list[int]],
    order: list[int],
    run: Callable[[int, torch.Tensor], torch.Tensor],
    run_grouped: Callable[[list[int], list[int], torch.Tensor], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Weighted sum of each token's chosen experts, running each expert once on all its tokens, in `order`.

    x [T, D], weights [T, k] fp32, chosen[t] = token t's k experts. Every (token, choice) result lands in
    its own row and the rows are summed in a fixed order, so the output does not depend on `order`.
    `run_grouped(experts, counts, xs)`, where given, runs them all in one call (xs: counts[i] rows for
    experts[i], in that order) or returns None, and then `run` runs each.
    """
    T, k = weights.shape
    if T == 1:  # decode: no index tensors to build and copy; the same rows, weighted and summed the same way
        rows = run_grouped(chosen[0], [1] * k, x.expand(k, -1)) if run_grouped else None  # [k, D], in choice order
        if rows is None:
            ys = {e: run(e, x) for e in order}  # [1, D] each
            rows = torch.cat([ys[e] for e in chosen[0]])
        return weigh(rows, weights, x.dtype)
    flat = [e for row in chosen for e in row]  # position p = t * k + j
    rank = {e: i for i, e in enumerate(order)}
    by_expert = sorted(range(T * k), key=lambda p: rank[flat[p]])  # positions grouped in run order
    # pinned, so that the copy to the GPU is queued, not waited for
    positions = torch.tensor(by_expert, pin_memory=x.is_cuda).to(x.device, non_blocking=True)  # [T*k]
    xs = x[positions // k]  # [T*k, D]: each expert's tokens together, gathered once for all experts
    tally = Counter(flat)  # one pass: a count per expert over all T*k was 25 ms a layer at 512 tokens x 8 of 256
    counts = [tally[e] for e in order]
    ys = run_grouped(order, counts, xs) if run_grouped else None  # [T*k, D]
    if ys is None:
        ys = torch.cat([run(e, part) for e, part in zip(order, xs.split(counts))])
    out = x.new_empty(T * k, x.shape[1])  # [T*k, D]
    out[positions] = (ys * weights.reshape(-1, 1)[positions]).to(x.dtype)
    return out.view(T, k, -1).sum(dim=1)  # [T, D]


class OffloadedExperts:
    """cpu_experts: "never" (every miss is copied into a slot), "always" (every miss runs on the CPU channel;
    the slots keep what warm-up and prefetch put there, the hot experts) or "auto" (each miss where `place`
    says it finishes first, given `speeds`)."""

    def __init__(
        self, cache: ExpertCache, prefetcher: Prefetcher | None, n_layers: int, cpu_experts: str = "never",
        speeds: ChannelSpeeds | None = None,
    ):
        if cpu_experts == "auto" and speeds is None:
            raise ValueError("cpu_experts='auto' needs the measured channel speeds")
        self.cache, self.prefetcher = cache, prefetcher
        self.cpu_experts, self.speeds = cpu_experts, speeds
        # where the "device" is the CPU itself (the tests), both channels run torch's kernels: the same bits
        self.cpu = CpuChannel(cache.store, kernels=cache.device.type != "cpu") if cpu_experts != "never" else None
        self.stats = ExpertStats(n_layers, cache.store.memory())
        self.predictions: dict[int, set[int]] = {}  # layer -> experts predicted for it
        self.prefetched: set[Key] = set()  # loaded by the prefetcher, not yet asked for
        self.copies_until = 0.0  # perf_counter() by which the copies issued so far should be done, at `speeds`

    def warm(self) -> None:
        """Fill the empty pool evenly across layers before the first token, so early tokens hit too."""
        cfg = self.cache.store.cfg
        keys = [(layer, e) for e in range(cfg.n_experts) for layer in range(cfg.n_moe_layers)]
        for key in keys[: self.cache.num_slots]:
            self.cache.load(key, set())

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        k = indices.shape[1]
        predicted = self.prefetcher.predict(layer, x) if self.prefetcher else None
        both = indices if predicted is None else torch.cat([indices, predicted], dim=1)  # [T, k or 2k]
        start = time.perf_counter()
        rows = both.tolist()  # the one host sync of this layer: which experts were chosen
        self.stats.sync_wait_s += time.perf_counter() - start
        chosen = [row[:k] for row in rows]
        wanted = list(dict.fromkeys(e for row in chosen for e in row))
        hits = [e for e in wanted if self.cache.resident((layer, e))]
        misses = [e for e in wanted if e not in hits]
        copied, on_cpu = self._place(chosen, misses)
        # The CPU channel starts first, so that it computes while the copies below are issued and run.
        futures = self._submit(layer, x, chosen, on_cpu)
        remaining = {(layer, e) for e in hits + copied}
        for e in copied:  # start every copy that has a slot now; the rest load when their turn comes
            self._load((layer, e), remaining)
        if predicted is not None:
            self._prefetch(layer + 1, [row[k:] for row in rows], remaining)
        self._count_requests(layer, hits, misses)  # after the copies are queued: they are what waits
        self.stats.layers[layer].on_cpu += len(on_cpu)

        if (len(chosen) == 1 and self.cache.store.format.groups_slots(x.device)
                and all(self.cache.resident((layer, e)) for e in chosen[0] if e not in futures)):  # fmt: skip
            return self._decode(layer, x, weights, chosen[0], futures, remaining)

        def run(e: int, xs: torch.Tensor) -> torch.Tensor:
            return self._collect(futures[e], x.device) if e in futures else self._run((layer, e), xs, remaining)

        # the CPU's results are waited for last, after every device expert is queued
        return mix(x, weights, chosen, hits + copied + on_cpu, run)

    def _decode(self, layer: int, x: torch.Tensor, weights: torch.Tensor, chosen: list[int], futures: dict, remaining: set[Key]) -> torch.Tensor:
        """One token whose device experts are all in slots (copies queued), in a format that runs them
        together: one `forward_slots` call, then the CPU channel's results are collected; the rows are
        weighted and summed as `mix` does."""
        keys = [(layer, e) for e in chosen if e not in futures]
        slots = [self.cache.acquire_slot(key) for key in keys]
        ys = self.cache.store.format.forward_slots(x, self.cache.slots, slots, self.cache.views) if keys else None  # [n, D]
        for key in keys:
            self.cache.release(key)
            remaining.discard(key)
        if futures:  # every row in choice order
            device_rows = iter(ys if ys is not None else ())
            ys = torch.cat([self._collect(futures[e], x.device) if e in futures else next(device_rows)[None] for e in chosen])
        return weigh(ys, weights, x.dtype)

    def _place(self, chosen: list[list[int]], misses: list[int]) -> tuple[list[int], list[int]]:
        if not misses or self.cpu_experts == "never":
            return misses, []
        if self.cpu_experts == "always":
            return [], misses
        tokens: dict[int, int] = {}
        for row in chosen:
            for e in row:
                tokens[e] = tokens.get(e, 0) + 1
        copies_ms = max(0.0, self.copies_until - time.perf_counter()) * 1e3  # copies still in flight, by the model
        return place(misses, tokens, self.speeds, (copies_ms, 0.0))  # the CPU worker is idle between layers

    def _submit(self, layer: int, x: torch.Tensor, chosen: list[list[int]], on_cpu: list[int]) -> dict:
        if not on_cpu:
            return {}
        x_cpu = x.to(CPU)  # [T, D]; the routing sync has already waited for x
        futures = {}
        for e in on_cpu:
            # the same rows, in the same order, as `mix` passes to an expert that runs on the device
            xs = x_cpu if len(chosen) == 1 else x_cpu[[t for t, row in enumerate(chosen) if e in row]]
            futures[e] = self.cpu.submit((layer, e), xs)
        return futures

    def _collect(self, future, device: torch.device) -> torch.Tensor:
        start = time.perf_counter()
        y, busy_s = future.result()
        self.stats.cpu_wait_s += time.perf_counter() - start
        self.stats.cpu_busy_s += busy_s
        return y.to(device)  # [n, D]: a small copy back to the device

    def _run(self, key: Key, xs: torch.Tensor, remaining: set[Key]) -> torch.Tensor:
        if not self.cache.resident(key) and not self._load(key, remaining):
            raise RuntimeError(f"no evictable expert slot for {key}: every slot holds an expert still needed")
        y = self.cache.store.format.forward(xs, self.cache.acquire(key))
        self.cache.release(key)
        remaining.discard(key)
        return y

    def _load(self, key: Key, protected: set[Key]) -> bool:
        if not self.cache.load(key, protected):
            return False
        self.stats.layers[key[0]].bytes_copied += self.cache.store.expert_bytes
        if self.speeds is not None:  # the copy engine's queue, as `place` models it
            self.copies_until = max(time.perf_counter(), self.copies_until) + self.speeds.copy_ms / 1e3
        return True

    def _count_requests(self, layer: int, hits: list[int], misses: list[int]) -> None:
        stats, requested = self.stats.layers[layer], hits + misses
        stats.hits += len(hits)
        stats.misses += len(misses)
        for e in hits:
            stats.prefetch_hits += (layer, e) in self.prefetched
        self.prefetched.difference_update((layer, e) for e in requested)
        predicted = self.predictions.pop(layer, None)
        if predicted is not None:
            stats.predicted_right += len(predicted.intersection(requested))
            stats.predicted_of += len(requested)

    def _prefetch(self, layer: int, predicted_rows: list[list[int]], protected: set[Key]) -> None:
        counts: dict[int, int] = {}
        for row in predicted_rows:
            for e in row:
                counts[e] = counts.get(e, 0) + 1
        self.predictions[layer] = set(counts)
        protected = set(protected)
        for e in sorted(counts, key=counts.get, reverse=True):  # most-wanted first, while slots last
            key = (layer, e)
            protected.add(key)
            if self.cache.resident(key):
                continue
            if not self._load(key, protected):
                break
            self.stats.layers[layer].prefetched += 1
            self.prefetched.add(key)


class ResidentExperts:
    """Every expert on the device; no cache, no copies. The reference for the offloaded path."""

    def __init__(self, store: ExpertStore, device: torch.device):
        self.cfg, self.format = store.cfg, store.format
        self.stats = ExpertStats(store.cfg.n_moe_layers, slots=False)  # stays at zero: nothing is cached or copied
        experts = range(store.cfg.n_experts)
        self.layers = [
            torch.stack([store.buffer((layer, e)) for e in experts]).to(device) for layer in range(store.cfg.n_moe_layers)
        ]  # uint8 [E, expert_bytes] each
        self.views = [[self.format.unpack(buffers[e]) for e in experts] for buffers in self.layers]

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        chosen = indices.tolist()
        order = sorted({e for row in chosen for e in row})
        return mix(x, weights, chosen, order, lambda e, xs: self.format.forward(xs, self.views[layer][e]))


class InPlaceExperts:
    """`--device cpu`: every expert runs from its store buffer where it lies in host RAM: no slots, no copies.
    Its stats count the experts run (`in_place`), not hits: there is no cache to hit (`hit_rate` is None)."""

    def __init__(self, store: ExpertStore):
        self.store, self.format = store, store.format
        self.stats = ExpertStats(store.cfg.n_moe_layers, store.memory(), slots=False)
        experts = range(store.cfg.n_experts)
        self.views = [[self.format.unpack(store.buffer((layer, e))) for e in experts] for layer in range(store.cfg.n_moe_layers)]
        self.tables = [self.format.decode_table(views) for views in self.views]  # a decode token's experts in one call

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        table = self.tables[layer]
        if table is not None and (y := table(x, weights, indices)) is not None:  # a decode step's tokens
            self.stats.layers[layer].in_place += len(set(indices.view(-1).tolist()))
            return y
        chosen = indices.tolist()
        order = list(dict.fromkeys(e for row in chosen for e in row))
        self.stats.layers[layer].in_place += len(order)

        def run(e: int, xs: torch.Tensor) -> torch.Tensor:
            with matmuls_for_rows(xs.shape[0]):  # one token routed to it: torch's own matrix-vector kernel
                return self.format.forward(xs, self.views[layer][e])

        def run_grouped(experts: list[int], counts: list[int], xs: torch.Tensor) -> torch.Tensor | None:
            return self.format.forward_grouped(xs, counts, [self.views[layer][e] for e in experts])

        return mix(x, weights, chosen, order, run, run_grouped)

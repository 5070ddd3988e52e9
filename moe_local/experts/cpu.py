"""The CPU channel: a missed expert can run on the host, straight from its `ExpertStore` buffer, instead of
being copied into a device slot. `place` (a pure function of measured speeds and queue state) decides per
miss; `measure_speeds` measures its inputs on this machine at load; `CpuChannel` runs the chosen experts on
a worker thread while the main thread issues the copies and the device's work. (`--device cpu` needs no
channel: `runtime.InPlaceExperts` runs every expert in place there.)"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from moe_local.experts.formats import ExpertFormat, Weights
from moe_local.experts.store import ExpertStore, Key

CPU_EXPERTS = ("auto", "never", "always")  # --cpu-experts: the cost model, every miss copied, every miss on the CPU
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Line:
    """A channel's time for one expert as a function of the tokens routed to it: fixed_ms + per_token_ms * T
    (reading the weights is the fixed part; each token adds its share of the FLOPs)."""

    fixed_ms: float
    per_token_ms: float

    def ms(self, tokens: int) -> float:
        return self.fixed_ms + self.per_token_ms * tokens

    @classmethod
    def through(cls, t1: int, ms1: float, t2: int, ms2: float) -> Line:
        per_token = max(0.0, (ms2 - ms1) / (t2 - t1))
        return cls(max(0.0, ms1 - per_token * t1), per_token)


@dataclass(frozen=True)
class ChannelSpeeds:
    """What one expert costs on each channel, measured on this machine (`measure_speeds`)."""

    copy_ms: float  # host -> device, one expert
    device: Line  # compute in a device slot
    cpu: Line  # compute on the host from the store buffer
    cpu_slowdown: float = 1.0  # host compute time x this while copies run (both read host RAM)


def place(
    misses: list[int], tokens: dict[int, int], speeds: ChannelSpeeds, queues: tuple[float, float] = (0.0, 0.0)
) -> tuple[list[int], list[int]]:
    """Split a layer's missed experts into (copied to the device, run on the CPU), each where it finishes first.

    tokens[e]: tokens routed to e in this layer; queues: ms of work already ahead on (the copy engine, the
    CPU worker). Greedy list scheduling, the experts with the most tokens first: the device channel is a
    sequence of copies (one copy engine), each followed by its compute, which overlaps the next copy, so an
    expert is done at `copies so far + its compute`; the CPU channel runs one expert after another, slowed
    by `cpu_slowdown` when copies run at the same time. Hits are not modelled: they run on the device,
    which is idle while it waits for copies anyway. Both lists keep the order of `misses`."""
    copies_end, cpu_end = queues
    on_cpu = set()
    for e in sorted(misses, key=lambda e: -tokens[e]):
        device_done = copies_end + speeds.copy_ms + speeds.device.ms(tokens[e])
        slowdown = speeds.cpu_slowdown if copies_end > cpu_end else 1.0
        cpu_done = cpu_end + speeds.cpu.ms(tokens[e]) * slowdown
        if cpu_done < device_done:
            on_cpu.add(e)
            cpu_end = cpu_done
        else:
            copies_end += speeds.copy_ms
    return [e for e in misses if e not in on_cpu], [e for e in misses if e in on_cpu]


def forward_on_cpu(fmt: ExpertFormat, xs: torch.Tensor, w: Weights, kernels: bool = True) -> torch.Tensor:
    """One expert on the CPU from its host buffer: moe-local's grouped kernel where `kernels` and it takes the
    format (bf16, int8; 1.5-2x torch's one-row kernels: docs/measurements.md), else the format's `forward`."""
    y = fmt.forward_grouped(xs, [xs.shape[0]], [w]) if kernels else None
    return fmt.forward(xs, w) if y is None else y


AGREEMENT = 0.1  # the CPU's result for an expert may differ from the device's by this much (relative rms) at most


def disagreement(store: ExpertStore, scratch: torch.Tensor, dtype: torch.dtype, kernels: bool = True) -> float:
    """How far the CPU channel's result for one expert and one token lies from the device's (relative rms).
    Where the CPU reads the device's own layout with a kernel of its own (int4 in CUDA's tiles), a misread
    would be wrong tokens and nothing else; bf16 and int4 differ by ~1% between the two (their roundings)."""
    fmt, key = store.format, store.keys()[0]
    scratch.copy_(store.buffer(key))
    x = torch.randn(1, store.cfg.dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = fmt.forward(x.to(scratch.device), fmt.unpack(scratch)).float().cpu()
    got = forward_on_cpu(fmt, x, fmt.unpack(store.buffer(key)), kernels).float()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def _median_ms(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure_speeds(
    store: ExpertStore, scratch: torch.Tensor, dtype: torch.dtype, many_tokens: int = 64, repeats: int = 5, kernels: bool = True
) -> ChannelSpeeds:
    """Measure this machine's channels with the store's first experts: copies into `scratch` (one device slot,
    uint8 [expert_bytes]), compute for 1 and `many_tokens` tokens in the slot and on the CPU from the store (as
    `CpuChannel(kernels)` runs them), and the CPU's compute while a thread keeps copying. Takes ~10 x (copy +
    CPU expert) time."""
    device, fmt = scratch.device, store.format
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    keys = store.keys()[: repeats + 2]
    turn = itertools.count()  # picks a different expert (or view) each call

    def copy() -> None:
        key = keys[next(turn) % len(keys)]  # not one a cache level already holds, as a miss is not
        scratch.copy_(store.buffer(key), non_blocking=store.is_pinned(key))

    if device.type == "cuda":  # an idle GPU's link runs slow until it has been busy a moment (docs/measurements.md)
        until = time.perf_counter() + 0.25
        while time.perf_counter() < until:
            copy()
            sync()
    copy_ms = _median_ms(copy, sync, repeats)
    slot = fmt.unpack(scratch)
    hosted = [fmt.unpack(store.buffer(key)) for key in keys]
    lines = {}
    for name, where, views in (("device", device, [slot]), ("cpu", CPU, hosted)):
        ms = {}
        for t in (1, many_tokens):
            x = torch.randn(t, store.cfg.dim, dtype=dtype, device=where)
            run = fmt.forward if where == device else (lambda xs, w: forward_on_cpu(fmt, xs, w, kernels))
            ms[t] = _median_ms(lambda: run(x, views[next(turn) % len(views)]), sync if where == device else lambda: None, repeats)
        lines[name] = Line.through(1, ms[1], many_tokens, ms[many_tokens])
    x = torch.randn(1, store.cfg.dim, dtype=dtype)
    alone = _median_ms(lambda: forward_on_cpu(fmt, x, hosted[next(turn) % len(hosted)], kernels), lambda: None, repeats)
    stop = threading.Event()

    def copier() -> None:
        while not stop.is_set():
            copy()
            sync()

    thread = threading.Thread(target=copier, daemon=True)
    thread.start()
    try:
        busy = _median_ms(lambda: forward_on_cpu(fmt, x, hosted[next(turn) % len(hosted)], kernels), lambda: None, repeats)
    finally:
        stop.set()
        thread.join()
    return ChannelSpeeds(copy_ms, lines["device"], lines["cpu"], max(1.0, busy / alone))


class CpuChannel:
    """Runs experts on one worker thread from their store buffers. One thread, because each expert's kernels
    already use torch's intra-op threads; torch releases the GIL inside them (ctypes inside moe-local's), so
    the main thread keeps issuing copies and device work meanwhile. `kernels`: moe-local's grouped kernel
    where it takes the format (`forward_on_cpu`); off where the device is the CPU itself, so that both
    channels run the same kernels there."""

    def __init__(self, store: ExpertStore, kernels: bool = True):
        self.store, self.kernels = store, kernels
        self.views = {}  # key -> the expert's parts, views into its store buffer, made on first use
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-local-cpu-experts")

    def submit(self, key: Key, xs: torch.Tensor) -> Future:
        """xs [n, D] on the CPU -> a future of (the expert's output [n, D] on the CPU, seconds it computed)."""
        return self.pool.submit(self._run, key, xs)

    def _run(self, key: Key, xs: torch.Tensor) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with torch.inference_mode():  # thread-local: the caller's mode does not reach this thread
            if key not in self.views:
                self.views[key] = self.store.format.unpack(self.store.buffer(key))
            y = forward_on_cpu(self.store.format, xs, self.views[key], self.kernels)
        return y, time.perf_counter() - start

    def close(self) -> None:
        self.pool.shutdown(wait=True)

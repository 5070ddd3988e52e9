"""How many OpenMP threads the CPU's work runs on, and how they wait. torch's intra-op pool and moe-local's kernels
share torch's libgomp (the kernels take torch's thread count on each call); docs/measurements.md, "Threads under
contention", has the figures behind both choices.

How they wait: libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when torch is imported. By default a waiting
thread spins 300,000 times (milliseconds) before it sleeps: when another process holds one of the cores, each thread
spins out its time slice waiting for one that is not running, and decode fell to 0.01-0.6x of the best thread
count. A short spin, GOMP_SPINCOUNT=300 (~15 us), kept 0.74-1.0x of the quiet speed; moe-local sets it unless the
user set either variable (`set_openmp_defaults`).

How many: no wait policy alone kept decode within 1.5x of the best thread count with one core taken, while one
thread fewer than the cores did. So on Linux an engine on the CPU device re-chooses torch's count as it works
(`ThreadCount`): every `INTERVAL_S` of stepping it reads /proc/stat, takes what the other processes used of the
cores it may run on since the last reading (all CPU time less this process's own; niced work, which yields, not
counted), and `choose_threads` leaves each core they keep busy to them, since a thread sharing a core with a busy
program stalls every parallel region it is part of; on a machine crowded with more runnable tasks than cores, that
is one thread (two threads decoded at 0.05-0.13x of one there: each step waits for both to be scheduled). It
cannot tell work that competes for a core from work that only fills the idle time at a lower scheduling weight
(another session's, under Linux's autogroups): that counts as busy too. The count is fixed where it was given:
`-t N` (`Options.threads`), or OMP_NUM_THREADS (torch took its count from it); it never exceeds torch's count when
the engine was built. Beside a GPU it stays fixed too: there the CPU threads serve only the CPU channel's misses,
whose speed is measured once at load with the count of that moment (`experts/cpu.py`). Where /proc/stat cannot
be read (not Linux), the count stays torch's, as before."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Collection

SPIN_COUNT = "300"

INTERVAL_S = 0.25  # how often the count is re-chosen while the engine works: one read of /proc/stat (~0.1 ms)
# A core counts as free while the others use less than this share of it (summed over all cores): a thread on a core
# a busy program also wants stalls each parallel region, where one thread fewer costs 1/threads.
BUSY_SHARE = 0.35
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit


def set_openmp_defaults() -> None:
    """Set GOMP_SPINCOUNT for libgomp, where the user set neither it nor OMP_WAIT_POLICY. Only before torch
    is imported: after that libgomp has read its environment, and the variable would only mislead."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


@dataclass(frozen=True)
class CpuSample:
    """One reading of the CPUs' times and of this process's: cumulative, so two make a window."""

    busy_ticks: int  # time the CPUs this process may use spent working (anyone's work, this process's too)
    total_ticks: int  # their time of every kind, idle and I/O wait included
    cpus: int  # how many those CPUs are
    own_s: float  # this process's CPU time, all its threads


def parse_proc_stat(text: str, allowed: Collection[int] | None = None, niced_busy: bool = False) -> tuple[int, int, int]:
    """Busy ticks, total ticks and how many CPUs, from /proc/stat's `cpuN` lines (user nice system idle iowait irq
    softirq steal ..., in clock ticks; guest time is inside user's already), of the CPUs in `allowed` (None: all).
    Work at a lowered priority (`nice`) yields its core, so it counts as idle, unless `niced_busy` (this process is
    niced itself, and its own time is there)."""
    busy = total = cpus = 0
    for line in text.splitlines():
        if line.startswith("cpu") and not line.startswith("cpu "):
            name, *fields = line.split()
            if allowed is None or int(name[3:]) in allowed:
                user, nice, system, idle, iowait, irq, softirq, steal = (list(map(int, fields[:8])) + [0] * 8)[:8]
                busy += user + system + irq + softirq + steal + (nice if niced_busy else 0)  # steal: the host's
                total += user + nice + system + irq + softirq + steal + idle + iowait
                cpus += 1
    if not cpus:
        raise ValueError("no cpuN lines in /proc/stat for the CPUs this process may use")
    return busy, total, cpus


def others_busy_cores(before: CpuSample, after: CpuSample) -> float:
    """How many of the cores, on average over the window, other processes kept busy: all work (as
    `parse_proc_stat` counts it) less this process's own CPU time."""
    total = after.total_ticks - before.total_ticks
    if total <= 0:
        return 0.0
    others = (after.busy_ticks - before.busy_ticks) - (after.own_s - before.own_s) * TICKS_PER_S
    return max(0.0, others / total * after.cpus)


def choose_threads(before: CpuSample, after: CpuSample, most: int) -> int:
    """The thread count for the next window, from the last one (two readings), at most `most`."""
    free = after.cpus - others_busy_cores(before, after)
    return max(1, min(most, math.floor(free + BUSY_SHARE)))


def read_sample() -> CpuSample:
    """Now, from /proc/stat; OSError where there is none (not Linux)."""
    with open("/proc/stat") as f:
        text = f.read()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    niced = os.getpriority(os.PRIO_PROCESS, 0) > 0
    return CpuSample(*parse_proc_stat(text, allowed, niced), time.process_time())


# (torch's count before a ThreadCount first changed it, the count one set last): a later engine's ceiling is the
# former while torch still has the latter, so that an engine built after another lowered the count is not held there
_changed: tuple[int, int] | None = None


class ThreadCount:
    """torch's thread count re-chosen while an engine works: `check()` before each step, on the engine's thread
    (OpenMP's count belongs to the thread that sets it). `read` and `clock` are /proc/stat's and time's, or a
    test's."""

    def __init__(self, read: Callable[[], CpuSample] | None = None, clock: Callable[[], float] = time.monotonic):
        import torch  # here, not at the top: this module is imported before torch, whose libgomp reads what it sets

        self._torch, self.read, self.clock = torch, read or read_sample, clock
        current = torch.get_num_threads()
        self.most = _changed[0] if _changed and _changed[1] == current else current
        # The window's start (where /proc cannot tell, OSError now). The first window is the engine's load, a later
        # one may be a pause between requests: this process's own time is left out of each, so what the others did
        # while it waited chooses the first step's count. Guessing too many threads costs that step far more than
        # too few (a thread sharing a busy core stalls every parallel region: 0.1x; one thread fewer: 0.5x at worst).
        self.last, self.last_at = self.read(), clock()

    def check(self) -> None:
        now = self.clock()
        if now - self.last_at < INTERVAL_S:
            return
        sample = self.read()
        self.set(choose_threads(self.last, sample, self.most))
        self.last, self.last_at = sample, now

    def set(self, threads: int) -> None:
        global _changed
        if threads != self._torch.get_num_threads():
            self._torch.set_num_threads(threads)
            _changed = (self.most, threads)


def thread_count(threads: int | None, device_type: str) -> ThreadCount | None:
    """What decides the thread count of an engine on `device_type`: None where it is fixed (`threads` given, which
    is set now; OMP_NUM_THREADS; beside a GPU; no /proc/stat), else a ThreadCount."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        return None
    if "OMP_NUM_THREADS" in os.environ or device_type != "cpu":
        return None
    try:
        return ThreadCount()
    except (OSError, ValueError):
        return None  # not Linux, or a /proc/stat we cannot read: torch's count, fixed

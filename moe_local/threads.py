"""How the CPU's OpenMP threads wait for work. torch's intra-op pool and moe-local's kernels share torch's
libgomp, which reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when torch is imported. By default a waiting
libgomp thread spins 300,000 times (milliseconds) before it sleeps: when another process holds one of the
cores, each thread spins out its time slice waiting for one that is not running, and decode fell to
0.01-0.6x of the best thread count. Measured on 2 cores (docs/measurements.md, "Threads under
contention"): a short spin, GOMP_SPINCOUNT=300 (~15 us), kept 0.74-1.0x of the quiet speed and was within
1.5x of the best in five loaded cases of eight; sleeping at once (OMP_WAIT_POLICY=PASSIVE) in four, and cost
more when quiet. So moe-local sets the short spin, unless the user set either variable."""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "300"


def set_openmp_defaults() -> None:
    """Set GOMP_SPINCOUNT for libgomp, where the user set neither it nor OMP_WAIT_POLICY. Only before torch
    is imported: after that libgomp has read its environment, and the variable would only mislead."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT

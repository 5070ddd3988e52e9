"""`--device cpu` decode speed by thread count and OpenMP wait policy, on a quiet machine and with one core
taken by another process.

    python scripts/threads_under_load.py                                  # the demo model
    python scripts/threads_under_load.py --model /tmp/peer/hf --experts-dtype int4 --resident-dtype int4
    python scripts/threads_under_load.py --policies default libgomp passive spin:10000 --rounds 3

Each run is `moe-local run --device cpu` (greedy, `--tokens` new tokens) in a process of its own, since
libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when torch loads it. Every policy runs at the default
thread count and at `-t 1`, with moe-local's kernels and with torch's alone (`MOE_LOCAL_KERNELS=0`), first
as the machine is ("as-is") and then with a busy loop (a Python process spinning, started and stopped here)
on one core ("busy"), round after round, so that a shared machine's drift slows all alike. It prints one
markdown row per (kernels, policy, threads) with the median decode tok/s of each condition and its ratio to
the best in that condition. Policies: `default` (nothing set: what moe-local chooses), `libgomp`
(GOMP_SPINCOUNT=300000, libgomp's own default when nothing is set), `passive` (OMP_WAIT_POLICY=PASSIVE),
`spin:N` (GOMP_SPINCOUNT=N)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def policy_env(policy: str) -> dict[str, str]:
    if policy == "default":
        return {}
    if policy == "libgomp":
        return {"GOMP_SPINCOUNT": "300000"}
    if policy == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    if policy.startswith("spin:"):
        return {"GOMP_SPINCOUNT": policy.split(":", 1)[1]}
    raise SystemExit(f"unknown policy {policy!r}: default, libgomp, passive or spin:N")


def decode_tok_per_s(args, policy: str, threads: int | None, kernels: bool) -> float:
    env = {name: value for name, value in os.environ.items() if name not in OPENMP_VARIABLES}
    env.update(policy_env(policy), MOE_LOCAL_KERNELS="1" if kernels else "0")
    command = [sys.executable, "-m", "moe_local.cli", "run", *([args.model] if args.model else []), "--device", "cpu", "--raw",
               "-p", args.prompt, "-n", str(args.tokens), "--temperature", "0", "--json", *args.extra]
    if threads is not None:
        command += ["-t", str(threads)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, preexec_fn=args.renice)
    except subprocess.TimeoutExpired:
        return 0.0  # as good as stopped
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)["stats"]["decode_tok_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the demo model)")
    parser.add_argument("--policies", nargs="+", default=["default", "libgomp", "passive"])
    parser.add_argument("--threads", nargs="+", default=["default", "1"], help="thread counts: default (none given) or a number")
    parser.add_argument("--kernels", nargs="+", default=["on", "off"], help="on: moe-local's kernels, off: MOE_LOCAL_KERNELS=0")
    parser.add_argument("--conditions", nargs="+", default=["as-is", "busy"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--nice", type=int, default=0, help="niceness of the runs and the busy loop: below 0 (as root) they take the "
                        "cores before the machine's other work, which makes 'as-is' close to a quiet machine")
    parser.add_argument("--experts-dtype", help="passed to run")
    parser.add_argument("--resident-dtype", help="passed to run")
    args = parser.parse_args()
    args.extra = [*(["--experts-dtype", args.experts_dtype] if args.experts_dtype else []),
                  *(["--resident-dtype", args.resident_dtype] if args.resident_dtype else [])]
    args.renice = (lambda: os.nice(args.nice)) if args.nice else None
    configs = [(k, p, None if t == "default" else int(t)) for k in args.kernels for p in args.policies for t in args.threads]
    speeds: dict[tuple, list[float]] = {}
    for round_ in range(args.rounds):
        for condition in args.conditions:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=args.renice) if condition == "busy" else None
            try:
                for kernels, policy, threads in configs:
                    speed = decode_tok_per_s(args, policy, threads, kernels == "on")
                    speeds.setdefault((condition, kernels, policy, threads), []).append(speed)
                    print(f"round {round_ + 1} {condition} kernels {kernels} {policy} -t {threads or 'default'}: {speed:.1f} tok/s",
                          file=sys.stderr, flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    medians = {key: statistics.median(values) for key, values in speeds.items()}
    print("| kernels | policy | -t | " + " | ".join(f"{c} tok/s (runs) | {c} vs best" for c in args.conditions) + " |")
    print("| --- | --- | --- | " + " | ".join("--- | ---" for _ in args.conditions) + " |")
    for kernels, policy, threads in configs:
        cells = []
        for condition in args.conditions:
            best = max(v for (c, k, _, _), v in medians.items() if c == condition and k == kernels)
            runs = ", ".join(f"{v:.0f}" for v in speeds[(condition, kernels, policy, threads)])
            median = medians[(condition, kernels, policy, threads)]
            cells.append(f"{median:.0f} ({runs}) | {median / best:.2f}")
        print(f"| {kernels} | {policy} | {threads or 'default'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

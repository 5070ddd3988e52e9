"""`--device cpu` decode speed by thread count and OpenMP wait policy, as the machine is and with one core
taken by another process.

    python scripts/threads_under_load.py                                  # the demo model
    python scripts/threads_under_load.py --model /tmp/peer/hf --experts-dtype int4 --resident-dtype int4
    python scripts/threads_under_load.py --runs default@auto libgomp@2 spin:3000@2 default@1

Each run (POLICY@THREADS) is an engine in a process of its own, since libgomp reads OMP_WAIT_POLICY and
GOMP_SPINCOUNT once, when torch loads it; each is made with moe-local's kernels and with torch's alone
(`MOE_LOCAL_KERNELS=0`). THREADS is `-t` (`threads=` of `load`), or `auto`: none given, so that moe-local
re-chooses the count from the idle cores as it decodes (moe_local/threads.py); the log on stderr says the count
each turn ended on. All load first; then, round after round, each decodes `--tokens` greedy tokens in
turn (the others wait on a pipe), first as the machine is ("as-is") and then with a busy loop (a Python
process spinning, started and stopped here) on one core ("busy"), so that a shared machine's drift slows
all alike. It prints one markdown row per run with the median decode tok/s of each condition and its ratio
to the best in that condition. Policies: `default` (nothing set: what moe-local chooses), `libgomp`
(GOMP_SPINCOUNT=300000: libgomp's own default when nothing is set), `passive` (OMP_WAIT_POLICY=PASSIVE),
`spin:N` (GOMP_SPINCOUNT=N)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys

OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
ENGINE = """
import json, sys
import torch, moe_local
from moe_local.generate import GenerationStats, SamplingParams
threads, model, options, prompt = json.loads(sys.argv[1])
engine = moe_local.load(model, device="cpu", threads=threads, **options)  # threads None: chosen as it runs
ids, greedy = engine.tokenizer.encode(prompt), SamplingParams(temperature=0)
print("ready", flush=True)
for line in sys.stdin:
    stats = GenerationStats()
    for _ in engine.generate(ids, int(line), greedy, stats):
        pass
    print(stats.decode_tok_per_s, torch.get_num_threads(), flush=True)
"""


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


def start(args, kernels: str, policy: str, threads: int | None) -> subprocess.Popen:
    env = {name: value for name, value in os.environ.items() if name not in OPENMP_VARIABLES}
    env.update(policy_env(policy), MOE_LOCAL_KERNELS="1" if kernels == "on" else "0")
    spec = json.dumps([threads, args.model, args.options, args.prompt])
    return subprocess.Popen([sys.executable, "-c", ENGINE, spec], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def main() -> None:
    import moe_local

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(os.path.join(os.path.dirname(moe_local.__file__), "demo")))
    parser.add_argument("--runs", nargs="+", default=["default@auto", "default@2", "default@1"],
                        help="POLICY@THREADS: a policy (default, libgomp, passive, spin:N) and a thread count (`-t`; auto: none "
                        "given, moe-local chooses it as it runs)")
    parser.add_argument("--kernels", nargs="+", default=["on", "off"], help="on: moe-local's kernels, off: MOE_LOCAL_KERNELS=0")
    parser.add_argument("--conditions", nargs="+", default=["as-is", "busy"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--nice", type=int, default=0, help="niceness of this session's scheduling group (Linux's autogroup), "
                        "which the engines and the busy loop share: below 0 (as root, the script started by `setsid`) they take "
                        "the cores before the machine's other sessions, which makes 'as-is' a quiet machine and 'busy' one "
                        "with one core taken")
    parser.add_argument("--experts-dtype", help="as in run")
    parser.add_argument("--resident-dtype", help="as in run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the engines and the busy loop are stopped on the way out
    args.options = {name: value for name, value in (("experts_dtype", args.experts_dtype), ("resident_dtype", args.resident_dtype)) if value}
    if args.nice:
        if os.getsid(0) != os.getpid():
            raise SystemExit("--nice sets this session's autogroup: start the script with `setsid`")
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(args.nice))
    configs = [(k, p, None if t == "auto" else int(t)) for k in args.kernels for p, t in (run.split("@") for run in args.runs)]
    engines, busy, speeds = {}, None, {}
    try:
        for config in configs:  # one at a time: loading is the slow part, and they would only slow each other
            engines[config] = start(args, *config)
            if engines[config].stdout.readline().strip() != "ready":
                raise SystemExit(f"the engine for {config} did not start")
        for round_ in range(args.rounds):
            for condition in args.conditions:
                if condition == "busy":
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for config, engine in engines.items():
                    engine.stdin.write(f"{args.tokens}\n")
                    engine.stdin.flush()
                    speed, ended = engine.stdout.readline().split()
                    speeds.setdefault((condition, *config), []).append(float(speed))
                    kernels, policy, threads = config
                    print(f"round {round_ + 1} {condition} kernels {kernels} {policy} -t {threads or 'auto'}: {float(speed):.1f} tok/s, "
                          f"{ended} threads at the end", file=sys.stderr, flush=True)
                if busy is not None:
                    busy.kill()
                    busy.wait()
                    busy = None
    finally:
        for process in [*engines.values(), *([busy] if busy else [])]:
            process.kill()
            process.wait()
    medians = {key: statistics.median(values) for key, values in speeds.items()}
    print("| kernels | policy | -t | " + " | ".join(f"{c}: tok/s, median (runs) | {c}: vs best" for c in args.conditions) + " |")
    print("| --- | --- | --- | " + " | ".join("--- | ---" for _ in args.conditions) + " |")
    for kernels, policy, threads in configs:
        cells = []
        for condition in args.conditions:
            best = max(v for (c, k, _, _), v in medians.items() if c == condition and k == kernels)
            runs = ", ".join(f"{v:.0f}" for v in speeds[(condition, kernels, policy, threads)])
            median = medians[(condition, kernels, policy, threads)]
            cells.append(f"{median:.0f} ({runs}) | {median / best:.2f}")
        print(f"| {kernels} | {policy} | {threads or 'auto'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

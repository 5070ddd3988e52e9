"""Decode on the CPU at long contexts with DeepSeek Sparse Attention (issue 28's target: a DeepSeek-V3.2-shaped
model decodes at 16k context within 1.3x of its time at 1k), and where a step's time goes.

The model has the preset's widths (attention, indexer, one expert) in a few layers, every one MoE, with random
weights as `bench` draws them and int4 experts; fewer routed experts than published (a decode token runs
top_k of them whatever the count, so a step's work is the same; host RAM is not). Instead of a prefill (16k
tokens take far too long on a small CPU) each context is reached by filling the caches with random latents,
rotary keys and index keys and placing the sequence there; one decode step then does what it does after a
real prefill of that length (the indexer scores every cached key, keeps topk, attention reads those).

    python scripts/dsa_context.py --contexts 1024,8192,16384,32768 --layers 4

prints, per context, the median time of a decode step and its split: the indexer's projections (`project`),
its scores and top-k (`select`), latent attention over what it keeps (`attend`), the routed experts, the rest
(norms, projections, shared expert, lm_head)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from moe_local.bench import random_model, random_store
from moe_local.budget import plan_memory
from moe_local.config import PRESETS, ModelConfig
from moe_local.engine import Engine, Options
from moe_local.experts.formats import make_format
from moe_local.model import Indexer, LatentAttention

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start
    return wrapper


def build(args) -> Engine:
    raw = {**PRESETS[args.preset], "num_hidden_layers": args.layers, "first_k_dense_replace": 0,
           "n_routed_experts": args.experts, "vocab_size": args.vocab}
    if raw.get("n_group", 1) > 1:  # keep the group-limited routing valid with fewer experts
        raw["n_group"], raw["topk_group"] = 2, 2
    cfg = ModelConfig.from_hf(raw)
    ctx = max(args.contexts) + args.steps + 2
    dtype, cpu = torch.bfloat16, torch.device("cpu")
    fmt = make_format(args.experts_dtype, cfg, dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    store, model = random_store(cfg, fmt, dtype, cpu, gen, 0, None), random_model(cfg, dtype, cpu, gen)
    plan = plan_memory(cfg, dtype, cpu, ctx, 16, expert_bytes=fmt.expert_bytes)
    return Engine(model, store, plan, Options(device="cpu"), ctx)


def fill(engine: Engine, n: int, gen: torch.Generator) -> None:
    """The engine's sequence holds n positions of random (unit-scale) latents, rotary keys and index keys."""
    for layer in engine.kv.layers:
        for t in layer:
            t[:n] = torch.randn(n, t.shape[1], generator=gen).to(t.dtype)
    engine.sequence.tokens = [3] * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="deepseek-v3.2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--experts-dtype", default="int4")
    parser.add_argument("--vocab", type=int, default=32000, help="a smaller vocabulary: lm_head is the same at every context")
    parser.add_argument("--contexts", default="1024,8192,16384,32768")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="the contexts are measured in turn this many times")
    parser.add_argument("--profile", action="store_true", help="then torch.profiler's busiest operations of one step at each context")
    args = parser.parse_args()
    args.contexts = [int(c) for c in args.contexts.split(",")]
    engine = build(args)
    Indexer.project = timed("project", Indexer.project)
    Indexer.select = timed("select", Indexer.select)
    LatentAttention._attend_latent = timed("attend", LatentAttention._attend_latent)
    engine.experts = timed("experts", engine.experts)
    gen = torch.Generator().manual_seed(1)
    results: dict[int, list] = defaultdict(list)
    for _ in range(args.rounds):
        for ctx in args.contexts:
            fill(engine, ctx, gen)
            engine.decode_one(5)  # warm-up at this context
            for _ in range(args.steps):
                SPENT.clear()
                start = time.perf_counter()
                engine.decode_one(int(torch.randint(3, args.vocab, (1,), generator=gen)))
                total = time.perf_counter() - start
                results[ctx].append({"total": total, **SPENT})
    report = {}
    for ctx, steps in results.items():
        median = {k: statistics.median(s.get(k, 0.0) for s in steps) * 1e3 for k in ("total", "project", "select", "attend", "experts")}
        median["rest"] = median["total"] - sum(median[k] for k in ("project", "select", "attend", "experts"))
        report[ctx] = {k: round(v, 2) for k, v in median.items()}
    base = report[min(report)]["total"]
    for ctx, r in report.items():
        print(f"ctx {ctx:6d}: {r['total']:8.2f} ms ({r['total'] / base:.2f}x)  project {r['project']:.2f}  select {r['select']:.2f}  "
              f"attend {r['attend']:.2f}  experts {r['experts']:.2f}  rest {r['rest']:.2f}")
    print(json.dumps({"layers": args.layers, "experts": args.experts, "ms": report}))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for ctx in args.contexts:
            fill(engine, ctx, gen)
            engine.decode_one(5)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.decode_one(7)
            print(f"ctx {ctx}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

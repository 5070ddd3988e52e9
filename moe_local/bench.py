"""`moe-local bench`: the offloading runtime on a model with a published geometry (Mixtral-8x7B by
default) and random weights generated on the device, measured against the channels it depends on and
against transformers + accelerate offloading the same geometry, in one run (see docs/measurements.md).

Random routers route close to uniformly: the worst case for any expert cache."""

from __future__ import annotations

import gc
import inspect
import itertools
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import psutil
import torch

from moe_local import native
from moe_local.budget import check_beside_experts, check_host_ram, embeddings_on_host, host_bytes_needed, plan_memory, plan_report
from moe_local.config import DTYPES, PRESETS, ModelConfig, preset_config
from moe_local.engine import Engine, Options, measure_workspace, resolve_device
from moe_local.errors import ConfigError
from moe_local.experts.cache import POLICIES
from moe_local.experts.cpu import CPU_EXPERTS, forward_on_cpu
from moe_local.experts.formats import EXPERTS_DTYPES, ExpertFormat, choose_format, make_format
from moe_local.experts.store import ExpertStore
from moe_local.model import Transformer

INIT_STD = 0.02  # transformers' initializer_range for Mixtral
CPU = torch.device("cpu")


@dataclass(frozen=True)
class BenchConfig:
    preset: str = "mixtral-8x7b"
    layers: int | None = None  # default: the preset's
    model: str | None = None  # a model's own weights (a folder, a GGUF file or an HF id) instead of the preset's random ones
    gpu_memory: str | None = None  # default: 12GiB on CUDA; on the CPU, every expert in place
    expert_slots: int | None = None  # overrides what gpu_memory implies
    prompt_tokens: int = 512
    new_tokens: int = 128
    dtype: str = "bf16"  # compute dtype
    experts_dtype: str | None = None  # the experts' format (see experts/formats.py); None: mxfp4 for a
    # preset published in MXFP4 (gpt-oss), else bf16
    group_size: int | None = None  # int4 only
    resident_dtype: str = "auto"  # int8, int4: the attention projections and MLPs in int8 or int4 (see Options)
    device: str | None = None
    policies: tuple[str, ...] = ("layer-lru", "lru")  # the first is the one reported at the top
    prefetch: bool = True
    prefetch_top: int | None = 1  # experts per token the prefetcher loads (None: top_k)
    compare_prefetch: bool = True  # one more run: the first policy with prefetch the other way
    peer_layers: int = 2  # transformers + accelerate offload on this many layers (0: skip)
    peer_tokens: int = 4
    seed: int = 0
    cpu_experts: str = "auto"  # where misses run (see Options): auto, never, always
    pageable: bool = False  # experts in pageable host memory, as on a machine that cannot pin them
    batch: int = 1  # > 1: one more run, this many sequences decoded together against one (`serve --parallel`)
    cuda_graphs: bool = False  # one more run: the first policy with its resident work per layer in CUDA graphs

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.peer_layers < 0 or self.peer_tokens < 1:
            raise ConfigError("--peer-layers must be >= 0 and --peer-tokens >= 1")
        if self.model is not None and (self.layers is not None or self.pageable):
            raise ConfigError(f"{'--layers' if self.layers is not None else '--pageable'} applies to a preset's random weights, not to --model's")
        if self.cpu_experts not in CPU_EXPERTS:
            raise ConfigError(f"unknown --cpu-experts {self.cpu_experts!r} (choose from {', '.join(CPU_EXPERTS)})")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ConfigError(f"unknown eviction policy {unknown[0] if unknown else ''!r} (choose from {', '.join(POLICIES)})")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r} (choose from bf16, fp16, fp32)")
        if self.experts_dtype is not None and self.experts_dtype not in EXPERTS_DTYPES:
            raise ConfigError(f"unknown experts dtype {self.experts_dtype!r} (choose from {', '.join(EXPERTS_DTYPES)})")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def timed_median(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the median call of fn on the CPU, after one warm-up call: on a busy machine one call that
    lost its core to another process would weigh on a mean (one expert at 9.36 ms where a decode layer running
    two took 5.77, on 2 cores under load)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Transformer:
    """The resident part with random weights drawn on the device (initialising on the CPU is far too slow)."""
    with torch.device("meta"):
        meta = Transformer(cfg)
        shapes = {name: p.shape for name, p in meta.state_dict().items()}
    # a zero-centred norm (scaled by 1 + w) is the identity at w = 0, a plain one at w = 1
    centred = {f"{name}.weight" for name, m in meta.named_modules() if getattr(m, "offset", False)}
    state = {
        name: torch.full(shape, 0.0 if name in centred else 1.0, dtype=dtype, device=device) if "norm" in name
        else normal(shape, dtype, device, gen, init_std(name, cfg))
        for name, shape in shapes.items()
    }
    if embeddings_on_host(cfg, device):  # as Engine.from_folder places them
        state["tok_embeddings.weight"] = state["tok_embeddings.weight"].cpu()
    return Transformer.from_state_dict(cfg, state, device)


def init_std(name: str, cfg: ModelConfig) -> float:
    """transformers' initializer_range, except where that would make the routing collapse. With every weight
    at 0.02, a layer adds ~1 per element to the residual stream against the embedding's 0.02, and what it
    adds (attention averaging over the context, above all) is nearly the same for every token: after a few
    layers every token routes to the same few experts (Qwen3-30B-A3B's geometry, 4 layers: 34 of 128
    experts over 48 tokens in the third layer, where uniform routing picks ~122), which flatters the cache.
    So the embeddings are drawn at 1, each token's own direction, and the projections back into the residual
    stream (attention's wo, the MLPs' and experts' w2) at 0.02 / sqrt(2 x layers), GPT-2's scaled
    initialisation: routing then stays close to uniform, as a trained model's does."""
    if name == "tok_embeddings.weight":
        return 1.0
    if name.endswith(("wo.weight", "w2.weight")) or name == "w2":
        return INIT_STD / math.sqrt(2 * cfg.n_layers)
    return INIT_STD


def normal(shape, dtype: torch.dtype, device: torch.device, gen: torch.Generator, std: float = INIT_STD) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype, device=device).mul_(std)


def random_store(
    cfg: ModelConfig, fmt: ExpertFormat, dtype: torch.dtype, device: torch.device, gen: torch.Generator,
    extra_host_bytes: int, progress: Callable[[int, int], None] | None, pageable: bool = False,
) -> ExpertStore:
    """Every expert drawn (and quantized) on the device and copied into (pinned) host memory, one at a time."""
    store = ExpertStore(cfg, fmt, pin=device.type == "cuda" and not pageable, extra_host_bytes=extra_host_bytes)
    store.fill_from(lambda layer, expert, w: normal(cfg.expert_shapes[w], dtype, device, gen, init_std(w, cfg)), device, progress)
    return store


def measure_channels(store: ExpertStore, dtype: torch.dtype, device: torch.device, repeats: int = 16) -> dict:
    """Host->device copy speed of one expert (into a device buffer, as a slot fill does) and one expert's
    compute for one token on the device and on the host CPU, in the store's format."""
    keys = store.keys()[: repeats + 1]
    sources = itertools.cycle(keys)  # a different expert each time, so no cache level holds it already
    slot = torch.empty(store.expert_bytes, dtype=torch.uint8, device=device)

    def copy() -> None:
        key = next(sources)
        slot.copy_(store.buffer(key), non_blocking=store.is_pinned(key))

    # An idle GPU's PCIe link runs slow until it has been busy for a moment: copy for a while first.
    warm_until = time.perf_counter() + 0.5
    while time.perf_counter() < warm_until:
        copy()
        sync(device)
    copy_s = timed(device, copy, repeats)
    fmt = store.format
    x = torch.randn(1, store.cfg.dim, dtype=dtype, device=device)
    device_s = timed(device, lambda: fmt.forward(x, fmt.unpack(slot)), repeats)
    cpu_fmt, cpu_buffers = cpu_experts(store, keys)
    x_cpu, cpu_sources = x.cpu(), itertools.cycle(cpu_buffers)
    cpu_s = timed_median(lambda: forward_on_cpu(cpu_fmt, x_cpu, cpu_fmt.unpack(next(cpu_sources))), repeats)  # as the CPU channel or --device cpu runs it
    del slot
    return {
        "h2d_gb_per_s": store.expert_bytes / copy_s / 1e9,
        "expert_copy_ms": 1e3 * copy_s,
        "device_expert_ms": 1e3 * device_s,
        "cpu_expert_ms": 1e3 * cpu_s,
        "cpu_threads": torch.get_num_threads(),
        "pinned": store.pinned,
    }


def cpu_experts(store: ExpertStore, keys: list) -> tuple[ExpertFormat, list[torch.Tensor]]:
    """The format the CPU's kernels read and some experts in it: the store's own where the CPU can run it,
    else (int4 laid out for CUDA where moe-local's kernel cannot read it) one expert re-quantized from random
    weights for the CPU."""
    fmt = store.format
    if fmt.cpu_unavailable():
        cpu_fmt = make_format(fmt.name, store.cfg, torch.bfloat16, "cpu", getattr(fmt, "group_size", None))
        buffer = torch.empty(cpu_fmt.expert_bytes, dtype=torch.uint8)
        w = {name: normal(shape, torch.bfloat16, CPU, torch.Generator().manual_seed(0)) for name, shape in store.cfg.expert_shapes.items()}
        biases = (w["b1"], w["b2"], w["b3"]) if store.cfg.expert_bias else None
        cpu_fmt.pack(w["w1"], w["w2"], w["w3"], buffer, biases)
        return cpu_fmt, [buffer]
    return fmt, [store.buffer(key) for key in keys]


def run_engine(engine: Engine, prompt: list[int], feed: list[int], channels: dict) -> tuple[dict, list[int]]:
    """Prefill the prompt, then decode one step per token of `feed`: speeds, cache counters, the copy bound,
    where a layer's time goes, and each step's most likely token (`channels`: `measure_channels`' speeds).

    Decode feeds given random tokens rather than its own output: a random model's greedy output soon
    repeats one token, which routes the same way every step and would flatter the cache."""
    device, h2d_bytes_per_s = engine.device, channels["h2d_gb_per_s"] * 1e9
    engine.tokens = []  # start from an empty KV cache; the pool keeps what warm-up left in it
    engine.experts.stats.reset()
    sync(device)
    start = time.perf_counter()
    logits, _ = engine.prefill(prompt)  # returns logits on the host: the device is done
    prefill_s = time.perf_counter() - start
    prefill = engine.experts.stats.as_dict()
    engine.experts.stats.reset()
    new_tokens, argmaxes = len(feed), [int(logits.argmax())]
    start = time.perf_counter()
    for token in feed:
        argmaxes.append(int(engine.decode_one(token).argmax()))
    decode_s = time.perf_counter() - start
    decode = engine.experts.stats.as_dict()
    per_token = decode["bytes_copied"] / new_tokens
    # the copies at the measured speed and the CPU channel's measured work, each alone, overlapped perfectly
    bound_s = max(per_token / h2d_bytes_per_s, decode["cpu_busy_s"] / new_tokens)
    per_layer_ms = 1e3 / new_tokens / engine.cfg.n_layers
    waited_s = decode["sync_wait_s"] + decode["cpu_wait_s"]
    on_device = decode["hits"] + decode["misses"] - decode["experts_on_cpu"]  # expert runs on the device (one token each)
    # in place (--device cpu, no slots) the experts run as the CPU channel's measurement ran them, from host RAM
    expert_ms = channels["cpu_expert_ms"] if engine.plan.in_place else channels["device_expert_ms"]
    return {
        "policy": "in place" if engine.plan.in_place else engine.options.policy,  # no slots: no policy applies
        "prefetch": getattr(engine.experts, "prefetcher", None) is not None,
        "cuda_graphs": engine.options.cuda_graphs,
        "cpu_experts": engine.experts.cpu_experts if hasattr(engine.experts, "cpu_experts") else "in place",
        "prefetch_top": engine.experts.prefetcher.per_token if getattr(engine.experts, "prefetcher", None) else 0,
        "prefill_tok_per_s": len(prompt) / prefill_s,
        "prefill_h2d_bytes": prefill["bytes_copied"],
        "prefill_efficiency": prefill["bytes_copied"] / h2d_bytes_per_s / prefill_s,
        "decode_tok_per_s": new_tokens / decode_s,
        "decode_ms_per_layer": 1e3 * decode_s / new_tokens / engine.cfg.n_layers,
        # of which the host waited for the device at the routing syncs; the rest is the host's own work
        # (Python and kernel launches): when the wait is near 0, the host is what limits decode
        "sync_wait_ms_per_layer": 1e3 * decode["sync_wait_s"] / new_tokens / engine.cfg.n_layers,
        "hit_rate": decode["hit_rate"],
        "prefetch_recall": decode["prefetch_recall"],
        "h2d_bytes_per_token": per_token,
        "misses_per_token": decode["misses"] / new_tokens,
        "prefetched_per_token": decode["prefetched"] / new_tokens,
        "experts_on_cpu": decode["experts_on_cpu"],
        "experts_on_cpu_per_token": decode["experts_on_cpu"] / new_tokens,
        "cpu_busy_ms_per_layer": decode["cpu_busy_s"] * per_layer_ms,  # the CPU channel computing
        "cpu_wait_ms_per_layer": decode["cpu_wait_s"] * per_layer_ms,  # the main thread waiting for it
        # where a layer's time goes: the host's own work (Python, launches) and its waits add up to the
        # measured time; the device's copies and expert compute, which overlap them, are the bytes copied and
        # the experts run at the speeds measured at load (`channels`)
        "host_ms_per_layer": (decode_s - waited_s) * per_layer_ms,
        "wait_ms_per_layer": waited_s * per_layer_ms,
        "copy_ms_per_layer": decode["bytes_copied"] / h2d_bytes_per_s * per_layer_ms,
        "compute_ms_per_layer": (on_device + decode["in_place"]) * expert_ms / 1e3 * per_layer_ms,
        "bound_tok_per_s": 1 / bound_s if bound_s else None,  # None: nothing was copied or run on the CPU
        "efficiency": bound_s / (decode_s / new_tokens) if bound_s else None,
    }, argmaxes


def run_batch(engine: Engine, seqs: list, prompts: list[list[int]], feed: torch.Tensor) -> dict:
    """Decode len(feed) steps of B = feed.shape[1] sequences `seqs` together (feed [steps, B]: random tokens,
    so routing stays close to uniform), each prefilled with its prompt first, and the same steps of the
    first sequence alone, on one engine (the plan with B KV caches, as `serve --parallel B` has): aggregate
    tokens per second, the ratio, and the bytes copied per step."""
    steps, B = feed.shape
    runs = {}
    for b in (1, B):
        for seq, prompt in zip(seqs[:b], prompts):
            seq.tokens = []
            engine.prefill(prompt, seq)
        engine.experts.stats.reset()
        start = time.perf_counter()
        for step in feed[:, :b].tolist():
            engine.decode_batch(seqs[:b], step)  # returns logits on the host: the device is done
        seconds = time.perf_counter() - start
        runs[b] = {"tok_per_s": b * steps / seconds, "h2d_bytes_per_step": engine.experts.stats.total().bytes_copied / steps}
    return {"sequences": B, "expert_slots": engine.plan.expert_slots, "one": runs[1], "together": runs[B],
            "speedup": runs[B]["tok_per_s"] / runs[1]["tok_per_s"]}


def measure_peer(preset: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, layers: int, tokens: int, seed: int) -> dict:
    """transformers' model of the preset's family with the routed experts offloaded to the CPU by accelerate
    (the way `device_map` with "cpu" entries runs them: weights copied to the device on every call), same
    geometry."""
    try:
        from accelerate import dispatch_model
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        return {"skipped": f"the peer needs transformers: {e}"}
    raw = {**PRESETS[preset], "num_hidden_layers": layers}
    raw["first_k_dense_replace"] = min(raw.get("first_k_dense_replace", 0), layers - 1)
    hf = AutoConfig.for_model(**raw)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init where the weights end up, in their dtype
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf).eval()
    finally:
        torch.set_default_dtype(default)
    experts = {name for name, _ in model.named_modules() if name.endswith(".experts")}
    for name in experts:
        model.get_submodule(name).to("cpu")
    owners = {name.rsplit(".", 1)[0] for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    main = torch.device(device.type, torch.cuda.current_device()) if device.type == "cuda" else device
    device_map = {}
    for owner in owners:
        expert = next((e for e in experts if owner == e or owner.startswith(e + ".")), None)
        device_map[expert or owner] = "cpu" if expert else main.index if main.type == "cuda" else "cpu"
    model = dispatch_model(model, device_map=device_map, main_device=main)
    prompt = torch.randint(cfg.vocab_size, (1, 16), device=main)
    # transformers 5.2x renamed past_key_values to cache (the old name goes in 5.40); older ones know only it
    cache = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        past, token = getattr(out, cache), out.logits[:, -1:].argmax(-1)
        sync(device)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(token, **{cache: past}, use_cache=True)
            past, token = getattr(out, cache), out.logits[:, -1:].argmax(-1)
        sync(device)
    seconds = time.perf_counter() - start
    del model, out, past
    return {"layers": layers, "tokens": tokens, "ms_per_layer": 1e3 * seconds / tokens / layers}


def machine(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "host_ram_bytes": psutil.virtual_memory().total,
        # moe-local's CPU kernels (decode attention, MXFP4), or why torch's ran instead
        "cpu_kernels": native.unavailable() or "built",
    }


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loaded_model(config: BenchConfig, options: Options, progress) -> tuple:
    """A model's own weights, loaded as `run` loads them (the experts' format `auto` unless asked: a GGUF's own
    blocks where moe-local has kernels for them)."""
    from moe_local.checkpoint import resolve_model_path

    setup = time.perf_counter()
    asked = replace(options, dtype=config.dtype, experts_dtype=config.experts_dtype or "auto", group_size=config.group_size)
    loaded = Engine.from_folder(resolve_model_path(config.model), asked, progress)
    why = "; ".join(loaded.notes)
    return loaded.cfg, loaded.store, loaded.model, loaded.plan, why, time.perf_counter() - setup


def random_weights(config: BenchConfig, options: Options, device: torch.device, dtype: torch.dtype, progress, say) -> tuple:
    """The preset's geometry with random weights drawn on the device, and the peer measured on it (before the
    experts take the host's memory)."""
    cfg, ctx_size, attention = preset_config(config.preset, config.layers), options.ctx_size, options.attention_dtype
    alone = plan_memory(cfg, dtype, device, ctx_size, options.prefill_chunk, expert_slots=cfg.n_experts, attention=attention)
    check_beside_experts(alone, ctx_size, attention, context_flag="--prompt-tokens or --new-tokens")
    beside = alone.beside_store_bytes
    experts_dtype = config.experts_dtype or ("mxfp4" if cfg.mxfp4_experts else "bf16")
    fmt, why = choose_format(experts_dtype, cfg, dtype, device.type, config.group_size, beside)
    say(why)
    plan = plan_memory(cfg, dtype, device, ctx_size, options.prefill_chunk, options.gpu_memory, config.expert_slots,
                       expert_bytes=fmt.expert_bytes, attention=attention)
    check_host_ram(host_bytes_needed(plan), f"{plan.total_experts} experts of this geometry", plan)  # before the peer's wait
    peer = None
    if config.peer_layers:
        say(f"peer: transformers + accelerate offload, {config.peer_layers} layers, {config.peer_tokens} tokens")
        peer = measure_peer(config.preset, cfg, dtype, device, config.peer_layers, config.peer_tokens, config.seed)
        free_device_memory(device)

    say(f"generating {plan.total_experts} random experts on {device.type} into host memory")
    gen = torch.Generator(device).manual_seed(config.seed)
    setup = time.perf_counter()
    store = random_store(cfg, fmt, dtype, device, gen, plan.beside_store_bytes, progress, config.pageable)
    model = random_model(cfg, dtype, device, gen)
    if attention:
        model.quantize_resident(attention)
    setup_s = time.perf_counter() - setup
    if device.type == "cuda":  # as Engine.from_folder does
        workspace = measure_workspace(model, fmt, ctx_size, options.prefill_chunk)
        plan = plan_memory(
            cfg, dtype, device, ctx_size, options.prefill_chunk, plan.budget_bytes, config.expert_slots, workspace, fmt.expert_bytes,
            attention,
        )
    return cfg, store, model, plan, why, setup_s, peer


def bench(
    config: BenchConfig,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> dict:
    """Run the whole benchmark; every figure in the result was measured in this call."""
    started = time.perf_counter()
    given = (("--gpu-memory", config.gpu_memory), ("--expert-slots", config.expert_slots))
    device, dtype = resolve_device(config.device, tuple(flag for flag, value in given if value is not None)), DTYPES[config.dtype]
    if config.cuda_graphs and device.type != "cuda":
        raise ConfigError("--cuda-graphs needs a CUDA device")
    ctx_size = config.prompt_tokens + config.new_tokens
    gpu_memory = config.gpu_memory
    if gpu_memory is None and config.expert_slots is None and device.type == "cuda":
        gpu_memory = "12GiB"
    options = Options(device=device.type, gpu_memory=gpu_memory, expert_slots=config.expert_slots, ctx_size=ctx_size,
                      prefetch=config.prefetch, prefetch_top=config.prefetch_top, resident_dtype=config.resident_dtype,
                      cpu_experts=config.cpu_experts, cuda_graphs=False)  # --cuda-graphs: one more run with them
    attention = options.attention_dtype
    if config.model is not None:
        cfg, store, model, plan, why, setup_s = loaded_model(config, options, progress)
        say(why)
        peer = None
        if config.peer_layers:
            say("peer: skipped (it draws a preset's random weights; --model runs the model's own)")
    else:
        cfg, store, model, plan, why, setup_s, peer = random_weights(config, options, device, dtype, progress, say)
    fmt = store.format
    result: dict = {"machine": machine(device), "config": {**asdict(config), "n_layers": cfg.n_layers}, "setup_s": setup_s}
    if result["machine"]["cpu_kernels"] != "built":
        say(f"moe-local's CPU kernels are not built, torch's run instead: {result['machine']['cpu_kernels']}")
    result["experts_format"] = {"key": fmt.key, "expert_bytes": fmt.expert_bytes, "why": why}
    result["plan"] = plan_report(cfg, plan, ctx_size)
    result["host_memory"] = store.memory()
    channels = result["channels"] = measure_channels(store, dtype, device)
    free_device_memory(device)

    tokens = torch.randint(cfg.vocab_size, (config.prompt_tokens + config.new_tokens,), generator=torch.Generator().manual_seed(config.seed))
    prompt, feed = tokens[: config.prompt_tokens].tolist(), tokens[config.prompt_tokens :].tolist()
    variants = [replace(options, policy=policy) for policy in config.policies]
    if config.compare_prefetch:  # the first policy again, with prefetch the other way
        variants.append(replace(variants[0], prefetch=not config.prefetch))
    if config.cuda_graphs:
        variants.append(replace(variants[0], cuda_graphs=True))
    if plan.in_place:  # no slots: nothing to evict or prefetch, every variant would run the same
        say("experts run in place from host RAM: no eviction policy or prefetch applies, so one run")
        variants = variants[:1]
    runs, outputs = [], []
    for variant in variants:
        say(f"{variant.policy}, prefetch {'on' if variant.prefetch else 'off'}{', CUDA graphs' if variant.cuda_graphs else ''}: "
            f"prefill {config.prompt_tokens} tokens, decode {config.new_tokens}")
        engine = Engine(model, store, plan, variant, ctx_size, generation_config={"eos_token_id": []})
        # warm-up: kernels (Triton compiles each on its first call: the whole prompt, so that prefill's too),
        # the allocator, CUDA graphs' capture
        run_engine(engine, prompt, feed[:2], channels)
        run, tokens = run_engine(engine, prompt, feed, channels)
        runs.append(run)
        outputs.append(tokens)
        del engine
        free_device_memory(device)
    result["runs"] = runs
    if config.batch > 1:
        say(f"{options.policy}: {config.batch} sequences decoded together against one, {config.new_tokens} steps")
        batch_plan = plan_memory(cfg, dtype, device, ctx_size, options.prefill_chunk, plan.budget_bytes, config.expert_slots,
                                 plan.workspace_bytes if plan.workspace_measured else None, fmt.expert_bytes, attention,
                                 config.batch)
        engine = Engine(model, store, batch_plan, replace(variants[0], sequences=config.batch), ctx_size,
                        generation_config={"eos_token_id": []})
        seqs = [engine.sequence] + [engine.new_sequence() for _ in range(config.batch - 1)]  # the pool's rows
        draw = torch.Generator().manual_seed(config.seed + 1)
        prompts = torch.randint(cfg.vocab_size, (config.batch, min(16, config.prompt_tokens)), generator=draw).tolist()
        feed_batch = torch.randint(cfg.vocab_size, (config.new_tokens, config.batch), generator=draw)
        run_batch(engine, seqs, prompts, feed_batch[:2])  # warm-up
        result["batch"] = run_batch(engine, seqs, prompts, feed_batch)
        del engine
        free_device_memory(device)
    # neither the policy nor prefetch may change what is computed, only how fast
    eager = [tokens for tokens, run in zip(outputs, runs) if not run["cuda_graphs"]]
    result["same_tokens_in_every_run"] = all(tokens == eager[0] for tokens in eager)
    for tokens, run in zip(outputs, runs):  # graphs attend over the whole masked cache: rounding may differ
        if run["cuda_graphs"]:
            run["same_tokens_as_eager"] = sum(a == b for a, b in zip(tokens, eager[0])) / len(tokens)
    main = runs[0]
    result.update({key: main[key] for key in (
        "policy", "prefetch", "decode_tok_per_s", "prefill_tok_per_s", "hit_rate", "prefetch_recall",
        "h2d_bytes_per_token", "experts_on_cpu", "bound_tok_per_s", "efficiency",
    )})
    same_prefetch = [run for run in runs if run["prefetch"] == config.prefetch] or runs  # in place: one run, no prefetch
    result["best_policy"] = max(same_prefetch, key=lambda run: run["decode_tok_per_s"])["policy"]
    result["peer"] = peer
    if peer and "ms_per_layer" in peer:
        result["speedup_vs_peer_per_layer"] = peer["ms_per_layer"] / main["decode_ms_per_layer"]
    result["total_s"] = time.perf_counter() - started
    return result

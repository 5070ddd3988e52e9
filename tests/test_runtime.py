"""The offloading runtime on its own: routing, the slot cache and its policy, prefetch and the counters."""

from __future__ import annotations

import ctypes
import itertools
import os
import platform
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import moe_local
from moe_local import cpu_matmul, int4, int8, native
from moe_local.config import ModelConfig, RouterConfig
from moe_local.experts.cache import POLICIES, ExpertCache, LayerLRUPolicy, LRUPolicy
from moe_local.experts.runtime import InPlaceExperts, mix
from moe_local.experts.formats import Dense, Int4, Int8, make_format
from moe_local.experts.store import ExpertStore
from moe_local.generate import SamplingParams
from moe_local.routing import route

GREEDY = SamplingParams(temperature=0)


def small_config(**overrides) -> ModelConfig:
    raw = dict(model_type="mixtral", vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    return ModelConfig.from_hf({**raw, **overrides})


def filled_store(cfg: ModelConfig) -> ExpertStore:
    store = ExpertStore(cfg, Dense(cfg, torch.float32), pin=False)
    gen = torch.Generator().manual_seed(0)
    store.fill_from(lambda layer, expert, w: torch.randn(cfg.expert_shapes[w], generator=gen), torch.device("cpu"))
    return store


def test_route_agrees_with_mistral_inference_formulation():
    """Softmax-then-top-k-then-renormalise equals top-k-on-logits-then-softmax (mistral-inference's moe.py)."""
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    weights, indices = route(logits, 2)
    top_logits, top_indices = torch.topk(logits, 2)
    assert torch.equal(indices, top_indices)
    assert torch.allclose(weights, torch.softmax(top_logits, dim=-1), atol=1e-6)
    raw_weights, _ = route(logits, 2, RouterConfig(renormalize=False))
    assert torch.allclose(raw_weights, torch.softmax(logits, -1).topk(2).values)


def test_lru_evicts_the_least_recently_used_unprotected_expert():
    policy = LRUPolicy(3, 2)
    for key in [(0, 0), (0, 1), (1, 0)]:
        policy.insert(key)
    policy.touch((0, 0))
    assert policy.evict(protected=set(), incoming=(1, 1)) == (0, 1)
    assert policy.evict(protected={(1, 0)}, incoming=(1, 1)) == (0, 0)
    assert policy.evict(protected={(1, 0)}, incoming=(1, 1)) is None


def test_layer_lru_keeps_each_layer_share_and_evicts_within_the_layer():
    policy = LayerLRUPolicy(5, 2)  # shares: layer 0 keeps 3, layer 1 keeps 2
    assert policy.share == [3, 2]
    for key in [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]:
        policy.insert(key)
    policy.touch((1, 0))
    assert policy.evict(set(), incoming=(1, 2)) == (1, 1)  # layer 1 is at its share: its own oldest goes
    policy.insert((1, 2))
    assert policy.evict({(0, 0)}, incoming=(0, 3)) == (0, 1)  # oldest unprotected of layer 0
    policy.insert((0, 3))
    # layer 0 below its share borrows from the layer furthest over its share
    policy.insert((1, 3))
    del policy.orders[0][(0, 2)]
    assert policy.evict(set(), incoming=(0, 4)) == (1, 0)
    assert policy.evict({(0, 0), (0, 3), (1, 2), (1, 3)}, incoming=(0, 4)) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_on_a_cyclic_decode_pattern(policy):
    """Decode asks layer 0, 1, ..., L-1, then again: a cycle longer than a small pool. Global LRU then
    evicts exactly what comes next (no hits); per-layer shares keep hitting."""
    cfg = small_config(num_hidden_layers=6)  # 6 layers x 4 experts, 1 chosen per layer, 4 slots
    cache = ExpertCache(filled_store(cfg), 4, torch.device("cpu"), POLICIES[policy](4, 6))
    gen = torch.Generator().manual_seed(0)
    hits = requests = 0
    for _ in range(200):
        for layer in range(6):
            key = (layer, int(torch.randint(4, (1,), generator=gen)))
            hits += cache.resident(key)
            requests += 1
            assert cache.load(key, set())
            cache.acquire(key)
    rate = hits / requests
    # per-layer shares: at best (slots - 1) / experts = 3 / 24, since one slot is always in transit
    assert rate == 0 if policy == "lru" else 0.1 < rate < 0.15


def test_cache_copies_each_miss_into_a_slot_and_evicts_when_full():
    cfg = small_config()
    store = filled_store(cfg)
    cache = ExpertCache(store, 2, torch.device("cpu"), LRUPolicy(2, 2))
    assert cache.load((0, 0), set()) and cache.load((0, 1), set())
    cache.acquire((0, 0))  # (0, 1) is now the least recently used
    assert cache.load((1, 3), set())
    assert cache.resident((0, 0)) and cache.resident((1, 3)) and not cache.resident((0, 1))
    got, want = cache.acquire((1, 3)), store.format.unpack(store.buffer((1, 3)))
    assert torch.equal(got["gate_up"], want["gate_up"]) and torch.equal(got["down"], want["down"])
    assert not cache.load((1, 2), protected={(0, 0), (1, 3)})  # nothing evictable


def test_mix_result_does_not_depend_on_the_order_experts_run():
    cfg = small_config()
    store = filled_store(cfg)
    x = torch.randn(6, cfg.dim, dtype=torch.float32)
    weights, indices = route(torch.randn(6, cfg.n_experts), 2)
    chosen = indices.tolist()
    experts = sorted({e for row in chosen for e in row})

    def run(e, xs):
        return store.format.forward(xs, store.format.unpack(store.buffer((0, e))))

    forward = mix(x, weights, chosen, experts, run)
    backward = mix(x, weights, chosen, experts[::-1], run)
    assert torch.equal(forward, backward)
    # and it is the weighted sum the definition says
    want = torch.stack([sum(weights[t, j] * run(chosen[t][j], x[t : t + 1])[0] for j in range(2)) for t in range(6)])
    assert torch.allclose(forward, want, atol=1e-5)


def test_a_decode_step_mixes_a_token_exactly_as_a_prefill_does():
    """T=1 has its own path in `mix` (no index tensors): same weighting in fp32, same rounding, same sum."""
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    weights, indices = route(torch.randn(5, 8), 2)
    chosen = indices.tolist()

    def run(e, xs):  # a different function per expert, row by row, so rows can be compared exactly
        return xs * (e + 1) - e

    together = mix(x, weights, chosen, sorted({e for row in chosen for e in row}), run)
    for t in range(5):
        alone = mix(x[t : t + 1], weights[t : t + 1], chosen[t : t + 1], chosen[t][::-1], run)
        assert torch.equal(alone, together[t : t + 1])


def test_swiglu_expert_matches_the_three_matrix_definition():
    cfg = small_config()
    w1, w2, w3 = torch.randn(cfg.ffn_dim, cfg.dim), torch.randn(cfg.dim, cfg.ffn_dim), torch.randn(cfg.ffn_dim, cfg.dim)
    store = ExpertStore(cfg, Dense(cfg, torch.float32), pin=False)
    store.fill_from(lambda layer, expert, w: {"w1": w1, "w2": w2, "w3": w3}[w], torch.device("cpu"))
    x = torch.randn(3, cfg.dim)
    want = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    assert torch.allclose(store.format.forward(x, store.format.unpack(store.buffer((1, 2)))), want, atol=1e-5)


def kernel_format(weights: str, cfg: ModelConfig, wide: bool = False):
    """The format the experts kernel takes (bf16, int8 with bf16 scales, int4 for the CPU), or with `wide` one
    beside it that it does not (fp32 weights or scales, int4 in CUDA's layout)."""
    if weights == "bf16":
        return Dense(cfg, torch.float32 if wide else torch.bfloat16)
    if weights == "int8":
        return Int8(cfg, torch.float32 if wide else torch.bfloat16)
    return Int4(cfg, 32, "cuda" if wide else "cpu")


def test_the_kernels_build_wherever_a_c_compiler_runs_on_x86():
    """The kernel tests skip where the kernels cannot be built (no compiler, another CPU): an error in
    cpu_kernels.c must fail here, not pass the suite as those skips."""
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if platform.machine().lower() not in ("x86_64", "amd64") or compiler is None or os.environ.get("MOE_LOCAL_KERNELS") == "0":
        pytest.skip("no C compiler on an x86 CPU here, or the kernels turned off")
    assert native.unavailable() is None


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
# bf16 pairs and VNNI where the CPU has them; without: bf16 widened to fp32, and no int8 or int4 (torch's kernels run them)
@pytest.mark.parametrize("flags", ["", "-mno-avx512bf16 -mno-avx512vnni"])
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])  # SwiGLU experts, and GeGLU's (Gemma 4's)
def test_the_cpu_kernel_runs_a_layers_experts_as_torch_does_but_for_the_order_of_sums(rebuilt, monkeypatch, flags, weights, act):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    cfg = replace(small_config(hidden_size=64, intermediate_size=128 if weights == "int4" else 96), expert_act=act)  # int4: blocks of 64 rows
    fmt = kernel_format(weights, cfg)
    store = ExpertStore(cfg, fmt, pin=False)
    gen = torch.Generator().manual_seed(0)
    store.fill_from(lambda layer, expert, w: torch.randn(cfg.expert_shapes[w], generator=gen) / 4, torch.device("cpu"))
    experts = [fmt.unpack(store.buffer((0, e))) for e in (2, 0, 3, 1)]
    counts = [1, 3, 0, 16]
    xs = torch.randn(sum(counts), cfg.dim, generator=gen).bfloat16()
    got = fmt.forward_grouped(xs, counts, experts)
    if {"int8": not native.library().experts_int8, "int4": not native.library().experts_int4}.get(weights):
        assert got is None
        return
    want = torch.cat([fmt.forward(part, w) for part, w in zip(xs.split(counts), experts)])  # torch's path
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # int4 weights meet the activations as int8 (in blocks of 32, as llama.cpp's q4_0 x q8_0): ~1% of an
    # output's size, where torch's fp32 FMAs are ~0.3% from the exact product of the same int4 weights
    tolerance = 2**-5 if weights == "int4" else 2**-6
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item())
    if weights == "int4":
        assert (got.float() - want.float()).norm() < 0.02 * want.float().norm()
    # each row's result is its own: it does not depend on the rows beside it (so batching changes nothing)
    assert torch.equal(fmt.forward_grouped(xs[1:2], [1], experts[1:2]), got[1:2])
    assert torch.equal(fmt.forward_grouped(xs[4:20], [16], experts[3:]), got[4:20])
    # an expert of more than 16 rows (a prefill's; int8 and int4 run them 16 at a time): the same bits
    more = fmt.forward_grouped(torch.cat([xs[4:20], xs[:5]]), [21], experts[3:])
    assert torch.equal(more, torch.cat([got[4:20], fmt.forward_grouped(xs[:5], [5], experts[3:])]))
    # what it does not take: fp32, fp32 weights or scales (int4: CUDA's layout), widths not multiples of 32
    # (int4: of 64)
    assert fmt.forward_grouped(xs.float(), counts, experts) is None
    wide = kernel_format(weights, cfg, wide=True)
    assert wide.forward_grouped(xs, counts, [wide.unpack(torch.zeros(wide.expert_bytes, dtype=torch.uint8))] * 4) is None
    odd = small_config(hidden_size=96, intermediate_size=160) if weights == "int4" else small_config(hidden_size=48, intermediate_size=80)
    other = kernel_format(weights, odd)
    assert other.forward_grouped(xs[:1, : odd.dim], [1], [other.unpack(torch.zeros(other.expert_bytes, dtype=torch.uint8))]) is None


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
def test_a_bf16_expert_of_many_rows_gives_each_row_the_bits_it_gets_alone():
    """A prefill's bf16 experts (two rows or more) widen each weight once for all of their rows, in tiles of 8
    rows and 256 k (`wide_products` in cpu_kernels.c); every row count from 1 to 17 and 37 (whole tiles and
    each rest), a width of a whole k tile and a rest (320) and one under a tile (96, the down products), give
    each row the kernel's fp32 sums it gets alone (a decode step's path, `dot8`), bit for bit, and so the same
    bf16 outputs; those are torch's but for the order of sums."""
    cfg = small_config(hidden_size=320, intermediate_size=96)
    fmt = kernel_format("bf16", cfg)
    store = ExpertStore(cfg, fmt, pin=False)
    gen = torch.Generator().manual_seed(0)
    store.fill_from(lambda layer, expert, w: torch.randn(cfg.expert_shapes[w], generator=gen) / 8, torch.device("cpu"))
    counts = [*range(1, 18), 37]
    experts = [fmt.unpack(store.buffer((0, e % 4))) for e in range(len(counts))]
    xs = torch.randn(sum(counts), cfg.dim, generator=gen).bfloat16()
    owner = [w for w, c in zip(experts, counts) for _ in range(c)]  # each row's expert

    def sums(xs: torch.Tensor, counts: list[int], experts: list) -> torch.Tensor:  # the kernel's fp32 output, before bf16
        n, lib = len(counts), native.library()
        starts = (ctypes.c_int * (n + 1))(0, *itertools.accumulate(counts))
        gate_up, down = ((ctypes.c_void_p * n)(*(w[name].data_ptr() for w in experts)) for name in ("gate_up", "down"))
        y = torch.empty(xs.shape, dtype=torch.float32)
        native.check(lib.experts_swiglu(xs.data_ptr(), cfg.dim, cfg.ffn_dim, n, starts, gate_up, down, None, None, y.data_ptr(), 2, 0), "experts")
        return y

    alone = torch.cat([sums(xs[r : r + 1], [1], [owner[r]]) for r in range(len(owner))])
    assert torch.equal(sums(xs, counts, experts), alone)
    got = fmt.forward_grouped(xs, counts, experts)
    assert torch.equal(got, alone.bfloat16())
    want = torch.cat([fmt.forward(part, w) for part, w in zip(xs.split(counts), experts)])  # torch's path
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-6 * want.abs().max().item())


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_a_decode_tokens_experts_in_one_call_are_the_grouped_kernel_and_weigh_bit_for_bit(weights):
    cfg = small_config(hidden_size=64, intermediate_size=128 if weights == "int4" else 96, num_local_experts=8, num_experts_per_tok=4)
    fmt = kernel_format(weights, cfg)
    store = ExpertStore(cfg, fmt, pin=False)
    gen = torch.Generator().manual_seed(0)
    store.fill_from(lambda layer, expert, w: torch.randn(cfg.expert_shapes[w], generator=gen) / 4, torch.device("cpu"))
    experts = InPlaceExperts(store)
    assert all(table is not None for table in experts.tables)
    x = torch.randn(1, cfg.dim, generator=gen).bfloat16()
    weights, indices = route(torch.randn(1, 8, generator=gen), 4)
    got = experts(1, x, weights, indices)
    assert experts.stats.layers[1].in_place == 4
    experts.tables = [None] * cfg.n_moe_layers  # the grouped kernel, then `weigh`
    assert torch.equal(got, experts(1, x, weights, indices))
    assert not torch.equal(got, experts(0, x, weights, indices))  # the layer's own experts
    assert experts.stats.layers[1].in_place == 8


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_a_batch_steps_experts_in_one_call_are_each_tokens_alone_and_the_grouped_kernel_bit_for_bit(weights):
    """20 tokens choosing 4 of 8 experts, all of them expert 0: more rows than the kernel takes at once."""
    cfg = small_config(hidden_size=64, intermediate_size=128 if weights == "int4" else 96, num_local_experts=8, num_experts_per_tok=4)
    store = ExpertStore(cfg, kernel_format(weights, cfg), pin=False)
    gen = torch.Generator().manual_seed(0)
    store.fill_from(lambda layer, expert, w: torch.randn(cfg.expert_shapes[w], generator=gen) / 4, torch.device("cpu"))
    experts = InPlaceExperts(store)
    x = torch.randn(20, cfg.dim, generator=gen).bfloat16()
    weights, indices = route(torch.randn(20, 8, generator=gen) + torch.tensor([4.0] + [0.0] * 7), 4)  # expert 0 for every token
    assert torch.bincount(indices.view(-1)).max() > 16
    got = experts(1, x, weights, indices)
    assert all(torch.equal(got[t : t + 1], experts(1, x[t : t + 1], weights[t : t + 1], indices[t : t + 1])) for t in range(20))
    experts.tables = [None] * cfg.n_moe_layers  # the grouped kernel, then `mix`
    assert torch.equal(got, experts(1, x, weights, indices))


def tinygemm_layout(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15) -> int32 [N/8, K/128, 32, 4], as torch's CUDA `_convert_weight_to_int4pack(nibbles, 8)`
    writes it (int4mm.cu, `matrix_to_m16n8k16_Bint4_layout`): lane t of an 8-row tile holds row t // 4, and its
    word j of super-tile s the k 128s + 32j + 2(t % 4) + (0, 8, 16, 24, 1, 9, 17, 25) in nibbles 0..7."""
    n, k = q.shape
    lane, j = torch.arange(32)[:, None, None], torch.arange(4)[None, :, None]
    ks = 32 * j + 2 * (lane % 4) + torch.tensor([0, 8, 16, 24, 1, 9, 17, 25])  # [32, 4, 8]
    rows = torch.arange(n // 8)[:, None] * 8 + torch.arange(32) // 4  # [N/8, 32]
    columns = 128 * torch.arange(k // 128)[:, None, None, None] + ks  # [K/128, 32, 4, 8]
    nibbles = q.long()[rows[:, None, :, None, None], columns[None]]  # [N/8, K/128, 32, 4, 8]
    return (nibbles << (4 * torch.arange(8))).sum(-1).to(torch.int32)  # wraps past 2^31, as the kernel's int32


def int4_experts(cfg: ModelConfig, group: int, n: int, gen: torch.Generator) -> tuple[list, list]:
    """n random int4 experts, each in the CPU's layout and in CUDA's (the same nibbles, scales and zeros)."""
    cpu, cuda = Int4(cfg, group, "cpu"), Int4(cfg, group, "cuda")
    experts = ([], [])
    for _ in range(n):
        parts = ({}, {})
        for name, (rows, k) in (("gate_up", (2 * cfg.ffn_dim, cfg.dim)), ("down", (cfg.dim, cfg.ffn_dim))):
            q = torch.randint(0, 16, (rows, k), generator=gen, dtype=torch.int32)
            scale = (torch.rand(k // group, rows, generator=gen) / 16 + 0.01).bfloat16()
            zero = (torch.randn(k // group, rows, generator=gen) / 8).bfloat16()
            scale_zero = torch.stack([scale, zero], dim=-1)  # [K/G, N, 2]
            parts[0].update({name: torch._convert_weight_to_int4pack_for_cpu(q, 1), f"{name}.scale_zero": scale_zero})
            parts[1].update({name: tinygemm_layout(q), f"{name}.scale_zero": scale_zero})
        for fmt, part, out in zip((cpu, cuda), parts, experts):
            buffer = torch.zeros(fmt.expert_bytes, dtype=torch.uint8)
            fmt.write(part, buffer)
            out.append(fmt.unpack(buffer))
    return experts


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("flags", ["", "-mno-avx512vbmi"])  # the activations rearranged by vpermt2b, or one by one
def test_int4_experts_in_cudas_layout_run_on_the_cpu_as_in_the_cpus_layout(rebuilt, monkeypatch, flags):
    """The CPU channel beside a GPU runs int4 misses from their host buffers, laid out for CUDA's kernel."""
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    cfg = small_config(hidden_size=128, intermediate_size=256)
    cpu, cuda = Int4(cfg, 32, "cpu"), Int4(cfg, 32, "cuda")
    on_cpu, on_cuda = int4_experts(cfg, 32, 3, torch.Generator().manual_seed(0))
    counts = [1, 0, 20]  # more rows than the CPU layout's kernel takes: this one takes any number
    xs = torch.randn(sum(counts), cfg.dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = cuda.forward_grouped(xs, counts, on_cuda)
    if not native.library().experts_int8:
        assert got is None and "AVX512-VNNI" in cuda.cpu_unavailable()
        return
    assert cuda.cpu_unavailable() is None and got.dtype == torch.bfloat16
    want = torch.cat([cpu.forward(part, w) for part, w in zip(xs.split(counts), on_cpu) if len(part)])  # torch's kernel
    # the activations as int8 in blocks of 32, as the CPU layout's kernel takes them (tests above)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-5, atol=2**-5 * want.abs().max().item())
    assert (got.float() - want.float()).norm() < 0.02 * want.float().norm()
    if native.library().experts_int4:  # the same int8 activations and weights: the same sums, in another order
        same = cpu.forward_grouped(xs[:17], [1, 16], [on_cpu[0], on_cpu[2]])
        torch.testing.assert_close(got[:17].float(), same.float(), rtol=2**-7, atol=2**-7 * same.abs().max().item())
    assert torch.equal(cuda.forward_grouped(xs[5:6], [1], on_cuda[2:]), got[5:6])  # each row's result is its own
    assert torch.equal(cuda.forward_grouped(xs.float(), counts, on_cuda), got.float())  # fp32 in: taken as bf16, as tinygemm does
    small = Int4(small_config(hidden_size=64, intermediate_size=128), 32, "cuda")  # not multiples of 128
    assert "multiples of 128" in small.cpu_unavailable()
    assert small.forward_grouped(xs[:1, :64], [1], [small.unpack(torch.zeros(small.expert_bytes, dtype=torch.uint8))]) is None


@pytest.mark.gpu
@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
def test_the_layout_read_on_the_cpu_is_the_one_cudas_kernel_writes():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 256), generator=gen, dtype=torch.int32)
    nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # as Int4.encode gives them to it
    assert torch.equal(torch._convert_weight_to_int4pack(nibbles.cuda(), 8).cpu(), tinygemm_layout(q))
    cfg = small_config(hidden_size=128, intermediate_size=256)
    fmt = make_format("int4", cfg, torch.bfloat16, "cuda", 32)
    buffer = torch.empty(fmt.expert_bytes, dtype=torch.uint8)
    w1, w2, w3 = (torch.randn(shape, generator=gen) / 4 for shape in cfg.expert_shapes.values())
    fmt.pack(w1.cuda(), w2.cuda(), w3.cuda(), buffer)  # on the GPU, by torch's CUDA kernel
    x = torch.randn(3, cfg.dim, generator=gen).bfloat16()
    want = fmt.forward(x.cuda(), fmt.unpack(buffer.cuda())).float().cpu()  # tinygemm
    got = fmt.forward_grouped(x, [3], [fmt.unpack(buffer)]).float()  # moe-local's kernel, from host memory
    torch.testing.assert_close(got, want, rtol=2**-5, atol=2**-5 * want.abs().max().item())


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("flags", ["", "-mno-avx512f"])  # the weights unpacked 32 at a time, or 16 (AVX2)
def test_the_bf16_linear_kernel_gives_torchs_product_and_each_row_as_it_would_alone(rebuilt, monkeypatch, flags):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 96, generator=gen).bfloat16(), torch.randn(40, generator=gen).bfloat16()
    x = torch.randn(16, 96, generator=gen).bfloat16()
    for b in (None, bias):
        got, want = cpu_matmul.rows_linear(x, weight, b), F.linear(x, weight, b)
        assert got.dtype == torch.bfloat16 and got.shape == (16, 40)
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.abs().max().item())  # the order of the sums
        assert all(torch.equal(cpu_matmul.rows_linear(x[i : i + 1], weight, b), got[i : i + 1]) for i in range(16))  # each row its own
    # what it does not take: a prefill's rows (WideLinear's), fp32, widths not multiples of 32 (input) and 8 (output)
    assert cpu_matmul.rows_linear(torch.zeros(32, 96).bfloat16(), weight) is None
    assert cpu_matmul.rows_linear(x.float(), weight.float()) is None
    assert cpu_matmul.rows_linear(x[:, :80], weight[:, :80]) is None
    assert cpu_matmul.rows_linear(x, weight[:36]) is None


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("flags", ["", "-mno-avx512vnni"])
def test_the_int8_linear_kernel_gives_torchs_product_for_a_decode_steps_rows(rebuilt, monkeypatch, flags):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    gen = torch.Generator().manual_seed(0)
    layer = int8.Int8Linear(torch.randn(40, 96, generator=gen).bfloat16())
    x = torch.randn(16, 96, generator=gen).bfloat16()
    got = int8.linear_kernel(x, layer.weight, layer.scale)
    if not native.library().experts_int8:
        assert got is None
        return
    want = int8.linear(x, layer.weight, layer.scale)  # torch's _weight_int8pack_mm
    assert got.dtype == torch.bfloat16 and got.shape == (16, 40)
    # the activations as int16 (2^-15 of each row's largest) and the order of the sums: within bf16's rounding
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.abs().max().item())
    assert torch.equal(layer(x), got)  # what Int8Linear runs for a decode step's rows
    assert torch.equal(int8.linear_kernel(x[3:4], layer.weight, layer.scale), got[3:4])  # a row's result is its own
    # what it does not take: more than 16 rows, fp32, fp32 scales, widths not multiples of 32 (input) and 8 (output)
    assert int8.linear_kernel(torch.zeros(17, 96).bfloat16(), layer.weight, layer.scale) is None
    assert int8.linear_kernel(x.float(), layer.weight, layer.scale) is None
    assert int8.linear_kernel(x, layer.weight, layer.scale.float()) is None
    assert int8.linear_kernel(x[..., :80], layer.weight[:, :80], layer.scale) is None
    assert int8.linear_kernel(x, layer.weight[:36], layer.scale[:36]) is None


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
@pytest.mark.parametrize("flags", ["", "-mno-avx512vbmi"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_int4_linear_kernel_gives_torchs_product_for_a_decode_steps_rows(rebuilt, monkeypatch, flags, group):
    monkeypatch.setenv("MOE_LOCAL_KERNEL_FLAGS", flags)
    gen = torch.Generator().manual_seed(0)
    layer = int4.Int4Linear(torch.randn(192, 256, generator=gen).bfloat16(), None, group)
    x = torch.randn(16, 256, generator=gen).bfloat16()
    got = int4.linear_kernel(x, layer.weight, layer.scale_zero, group)
    if not native.library().experts_int4:
        assert got is None and torch.equal(layer(x), int4.linear(x, layer.weight, layer.scale_zero, group, "cpu"))
        return
    want = int4.linear(x, layer.weight, layer.scale_zero, group, "cpu")  # torch's _weight_int4pack_mm_for_cpu
    assert got.dtype == torch.bfloat16 and got.shape == (16, 192)
    # the activations as int8 in blocks of 32 (as the int4 experts' kernel takes them): ~1% rms
    assert (got.float() - want.float()).norm() <= 0.02 * want.float().norm()
    assert torch.equal(layer(x), got)  # what Int4Linear runs for a decode step's rows
    assert torch.equal(int4.linear_kernel(x[3:4], layer.weight, layer.scale_zero, group), got[3:4])  # a row's result is its own
    # more than 16 rows (a prefill's) run 16 at a time: the same bits
    more = torch.cat([x, x[:5]])
    assert torch.equal(layer(more), torch.cat([got, got[:5]]))
    # what it does not take: fp32, output widths not multiples of 64
    assert int4.linear_kernel(x.float(), layer.weight, layer.scale_zero, group) is None
    narrow = int4.Int4Linear(torch.randn(48, 256, generator=gen).bfloat16(), None, group)
    assert int4.linear_kernel(x, narrow.weight, narrow.scale_zero, group) is None


def test_a_small_pool_misses_evicts_and_counts_every_byte(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu", expert_slots=3, prefetch=False)
    list(engine.generate([1, 10, 20, 30], 16, GREEDY))
    stats = engine.experts.stats.total()
    n_layers = engine.cfg.n_layers
    assert stats.misses > 0 and stats.prefetched == 0
    assert stats.bytes_copied == stats.misses * engine.store.expert_bytes
    # each decode step asks every layer for 1 or 2 experts; 3 slots cannot keep 3 layers' worth
    assert stats.hits + stats.misses >= n_layers * 16
    assert len(engine.experts.cache.slot_of) == 3


def test_all_experts_resident_never_copies_after_load(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu", expert_slots=24)
    list(engine.generate([1, 10, 20, 30], 16, GREEDY))
    stats = engine.experts.stats.total()
    assert stats.misses == 0 and stats.bytes_copied == 0 and stats.hits > 0


def test_prefetch_loads_next_layer_experts_ahead_and_they_are_hit(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu", expert_slots=6, prefetch=True)
    list(engine.generate([1, 10, 20, 30], 24, GREEDY))
    stats = engine.experts.stats.as_dict()
    assert stats["prefetched"] > 0
    assert 0 < stats["prefetch_hits"] <= stats["prefetched"]
    assert stats["bytes_copied"] == (stats["misses"] + stats["prefetched"]) * engine.store.expert_bytes
    assert 0 < stats["prefetch_recall"] <= 1
    assert stats["per_layer"][0]["predicted_of"] == 0  # nothing predicts the first layer
    assert all(layer["predicted_of"] > 0 for layer in stats["per_layer"][1:])

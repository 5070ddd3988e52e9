"""Two channels for a missed expert (copy it to the device, or run it on the CPU from its store buffer): the
cost model's decisions on synthetic measured speeds, the CPU channel running beside the copies, results
that do not depend on where an expert ran, and `--device cpu` running every expert in place."""

from __future__ import annotations

import threading

import pytest
import torch

import moe_local
from moe_local import native
from moe_local.engine import Options
from moe_local.errors import ConfigError
from moe_local.experts.cache import ExpertCache, LayerLRUPolicy
from moe_local.experts import cpu
from moe_local.experts.cpu import ChannelSpeeds, CpuChannel, Line, measure_speeds, place
from moe_local.experts.formats import Dense
from moe_local.experts.runtime import InPlaceExperts, OffloadedExperts, ResidentExperts
from moe_local.experts.store import ExpertStore
from moe_local.generate import GenerationStats, SamplingParams, generate
from moe_local.routing import route
from test_runtime import filled_store, small_config

# One expert: a consumer PCIe link takes 10 ms to copy it and the CPU 2 ms to run it for one token.
SLOW_LINK = ChannelSpeeds(copy_ms=10.0, device=Line(0.1, 0.001), cpu=Line(2.0, 0.5), cpu_slowdown=1.5)
# A fast link: 1 ms to copy, 6 ms on the CPU.
FAST_LINK = ChannelSpeeds(copy_ms=1.0, device=Line(0.1, 0.001), cpu=Line(6.0, 0.5), cpu_slowdown=2.0)


def test_a_slow_link_sends_a_decode_tokens_misses_to_the_cpu():
    assert place([3, 5], {3: 1, 5: 1}, SLOW_LINK) == ([], [3, 5])


def test_a_fast_link_sends_misses_to_the_device():
    assert place([3, 5], {3: 1, 5: 1}, FAST_LINK) == ([3, 5], [])


def test_prefill_sends_misses_to_the_device_even_over_a_slow_link():
    """A prefill chunk routes many tokens to each expert: the CPU's time grows with them, a copy's does not."""
    tokens = {e: 128 for e in range(8)}
    assert place(list(range(8)), tokens, SLOW_LINK) == (list(range(8)), [])


def test_when_the_channels_are_close_both_are_used_and_each_list_keeps_the_order():
    speeds = ChannelSpeeds(copy_ms=2.0, device=Line(0.1, 0.0), cpu=Line(2.5, 0.0))
    copied, on_cpu = place([7, 1, 4, 2], {7: 1, 1: 1, 4: 1, 2: 1}, speeds)
    assert copied and on_cpu and sorted(copied + on_cpu) == [1, 2, 4, 7]
    assert copied == [e for e in [7, 1, 4, 2] if e in copied] and on_cpu == [e for e in [7, 1, 4, 2] if e in on_cpu]


def test_copies_already_in_flight_push_misses_to_the_cpu():
    assert place([0], {0: 1}, FAST_LINK, queues=(0.0, 0.0)) == ([0], [])
    assert place([0], {0: 1}, FAST_LINK, queues=(20.0, 0.0)) == ([], [0])  # the copy engine is busy for 20 ms


def test_the_cpus_slowdown_under_copies_counts():
    """With 0.5 ms of copies ahead, 2.5 ms on the CPU beats 3.5 ms on the device, but not at 1.5x (3.75 ms)."""
    speeds = ChannelSpeeds(copy_ms=3.0, device=Line(0.0, 0.0), cpu=Line(2.5, 0.0), cpu_slowdown=1.0)
    assert place([0], {0: 1}, speeds, queues=(0.5, 0.0)) == ([], [0])
    slowed = ChannelSpeeds(copy_ms=3.0, device=Line(0.0, 0.0), cpu=Line(2.5, 0.0), cpu_slowdown=1.5)
    assert place([0], {0: 1}, slowed, queues=(0.5, 0.0)) == ([0], [])


def test_a_line_through_two_measurements():
    line = Line.through(1, 2.0, 65, 10.0)
    assert line.ms(1) == pytest.approx(2.0) and line.ms(65) == pytest.approx(10.0)
    assert Line.through(1, 3.0, 64, 2.0) == Line(3.0, 0.0)  # noise that says "faster with more tokens": flat


def test_measured_speeds_are_positive_and_placement_works_with_them():
    store = filled_store(small_config())
    scratch = torch.empty(store.expert_bytes, dtype=torch.uint8)
    speeds = measure_speeds(store, scratch, torch.float32, repeats=3)
    assert speeds.copy_ms > 0 and speeds.cpu.ms(1) > 0 and speeds.device.ms(1) > 0 and speeds.cpu_slowdown >= 1
    copied, on_cpu = place([0, 1], {0: 1, 1: 1}, speeds)
    assert sorted(copied + on_cpu) == [0, 1]


@pytest.mark.skipif(native.unavailable() is not None, reason=f"moe-local's CPU kernels: {native.unavailable()}")
def test_beside_a_gpu_the_cpu_channel_takes_moe_locals_experts_kernel_and_on_the_cpu_torchs(monkeypatch):
    cfg = small_config(hidden_size=64, intermediate_size=96)
    store = ExpertStore(cfg, Dense(cfg, torch.bfloat16), pin=False)
    gen = torch.Generator().manual_seed(0)
    store.fill_from(lambda layer, expert, w: torch.randn(cfg.expert_shapes[w], generator=gen) / 4, torch.device("cpu"))
    ran, grouped, forward = [], Dense.forward_grouped, Dense.forward
    monkeypatch.setattr(Dense, "forward_grouped", lambda self, *a: ran.append("kernel") or grouped(self, *a))
    monkeypatch.setattr(Dense, "forward", lambda self, *a: ran.append("torch") or forward(self, *a))
    x = torch.randn(3, cfg.dim, generator=gen).bfloat16()
    want = forward(store.format, x, store.format.unpack(store.buffer((1, 2))))
    for kernels, path in ((True, ["kernel"]), (False, ["torch"])):
        channel, ran[:] = CpuChannel(store, kernels=kernels), []
        try:
            y, _ = channel.submit((1, 2), x).result()
        finally:
            channel.close()
        assert ran == path
        torch.testing.assert_close(y.float(), want.float(), rtol=2**-6, atol=2**-6 * want.abs().max().item())


def one_each(store) -> ChannelSpeeds:
    """Speeds under which, of two one-token misses, the first is copied and the second runs on the CPU."""
    return ChannelSpeeds(copy_ms=1.0, device=Line(0.0, 0.0), cpu=Line(1.5, 0.0))


def test_a_cpu_expert_runs_while_copies_are_in_flight_and_results_are_summed_in_order(monkeypatch):
    """The CPU expert starts before the layer's copies are issued and is still running while they happen:
    each side waits for the other to have started, which would time out if they ran one after the other."""
    cfg = small_config()
    store = filled_store(cfg)
    cache = ExpertCache(store, 2, torch.device("cpu"), LayerLRUPolicy(2, cfg.n_moe_layers))
    experts = OffloadedExperts(cache, None, cfg.n_moe_layers, "auto", one_each(store))
    cpu_started, copy_done, seen = threading.Event(), threading.Event(), {}
    run_on_cpu, copy_into = CpuChannel._run, ExpertCache._copy_into

    def slow_cpu_run(self, key, xs):
        cpu_started.set()
        seen["copy done while the CPU expert ran"] = copy_done.wait(timeout=10)
        return run_on_cpu(self, key, xs)

    def copy_after_the_cpu_started(self, slot, key):
        seen["CPU expert running when the copy began"] = cpu_started.wait(timeout=10)
        copy_into(self, slot, key)
        copy_done.set()

    monkeypatch.setattr(CpuChannel, "_run", slow_cpu_run)
    monkeypatch.setattr(ExpertCache, "_copy_into", copy_after_the_cpu_started)
    x = torch.randn(1, cfg.dim)
    weights, indices = torch.tensor([[0.7, 0.3]]), torch.tensor([[2, 1]])
    y = experts(0, x, weights, indices)
    assert seen == {"CPU expert running when the copy began": True, "copy done while the CPU expert ran": True}
    assert torch.equal(y, ResidentExperts(store, torch.device("cpu"))(0, x, weights, indices))
    stats = experts.stats.as_dict()
    assert (stats["misses"], stats["experts_on_cpu"], stats["bytes_copied"]) == (2, 1, store.expert_bytes)
    assert cache.resident((0, 2)) and not cache.resident((0, 1))  # the CPU's expert took no slot
    assert stats["cpu_busy_s"] > 0


def test_prefill_rows_reach_a_cpu_expert_as_they_reach_a_device_expert():
    cfg = small_config()
    store = filled_store(cfg)
    x = torch.randn(9, cfg.dim)
    weights, indices = route(torch.randn(9, cfg.n_experts, generator=torch.Generator().manual_seed(1)), 2)
    want = ResidentExperts(store, torch.device("cpu"))(1, x, weights, indices)
    for mode in ("never", "always"):
        cache = ExpertCache(store, 2, torch.device("cpu"), LayerLRUPolicy(2, cfg.n_moe_layers))
        experts = OffloadedExperts(cache, None, cfg.n_moe_layers, mode)
        assert torch.equal(experts(1, x, weights, indices), want), mode


def greedy_with(engine, ids: list[int], n: int) -> list[int]:
    return list(generate(engine, ids, n, SamplingParams(temperature=0), set(), GenerationStats()))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("together", [False, True])
def test_tokens_and_logits_do_not_depend_on_where_misses_run(tiny, dtype, together, monkeypatch):
    """On the CPU both channels run the same kernels, so outputs are bit-identical (on CUDA, fp32 greedy
    tokens are identical and bf16 logits differ by the kernels' rounding: see docs/architecture.md).
    `together`: a decode token's device experts go through one `forward_slots` call (`_decode`, what
    MXFP4 takes on CUDA), with the CPU channel's rows merged in."""
    folder, _ = tiny
    ids = [1, 10, 20, 30, 40, 50]
    decoded = []
    if together:
        monkeypatch.setattr(Dense, "groups_slots", lambda self, device: True)
        decode = OffloadedExperts._decode
        monkeypatch.setattr(OffloadedExperts, "_decode", lambda self, *a: decoded.append(a[3]) or decode(self, *a))
    engines = {}
    for mode in ("never", "always", "auto"):
        engine = moe_local.load(folder, device="cpu", dtype=dtype, expert_slots=3, cpu_experts=mode)
        if mode == "auto":  # the CPU device means `never`; give the cost model a consumer link to decide on
            old = engine.experts
            engine.experts = OffloadedExperts(old.cache, old.prefetcher, engine.cfg.n_moe_layers, "auto", SLOW_LINK)
        engines[mode] = engine
    want_tokens = greedy_with(engines["never"], ids, 12)
    want_logits = engines["never"].logits(ids + want_tokens)
    for mode, engine in engines.items():
        engine.experts.stats.reset()
        assert greedy_with(engine, ids, 12) == want_tokens, mode
        assert torch.equal(engine.logits(ids + want_tokens), want_logits), mode
        s = engine.experts.stats.as_dict()
        assert s["bytes_copied"] == (s["misses"] - s["experts_on_cpu"] + s["prefetched"]) * engine.store.expert_bytes
        if mode == "never":
            assert s["experts_on_cpu"] == 0
        else:  # a decode token's misses go to the CPU over a slow link, and all of them with `always`
            assert s["experts_on_cpu"] > 0 and s["cpu_busy_s"] > 0
        if mode == "always":
            assert s["experts_on_cpu"] == s["misses"]
    assert bool(decoded) == together


def test_cpu_device_runs_every_expert_in_place_without_copies(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu")
    assert isinstance(engine.experts, InPlaceExperts)
    tokens = greedy_with(engine, [1, 10, 20, 30], 16)
    stats = engine.experts.stats.as_dict()
    assert stats["bytes_copied"] == 0 and stats["misses"] == stats["hits"] == 0 and stats["in_place"] > 0
    assert stats["hit_rate"] is None  # no slots: no cache to hit
    assert tokens == greedy_with(moe_local.load(folder, device="cpu", expert_slots=3), [1, 10, 20, 30], 16)
    view = engine.experts.views[1][3]["gate_up"]  # the expert's weights are the store's own bytes
    assert view.untyped_storage().data_ptr() == engine.store.buffer((1, 3)).untyped_storage().data_ptr()


def test_a_cpu_channel_that_disagrees_with_the_device_is_refused(tiny, monkeypatch):
    """The load runs one expert on both channels; a CPU kernel that misread the device's layout would give
    wrong tokens and nothing else, so it is not used (beside a GPU, `auto` copies every miss instead; on the
    CPU device `auto` is `never` anyway, so `always` is what the CPU can test)."""
    folder, _ = tiny
    fine = moe_local.load(folder, device="cpu", dtype="fp32", expert_slots=3, cpu_experts="always")
    assert fine.experts.cpu_experts == "always"
    monkeypatch.setattr(cpu, "forward_on_cpu", lambda fmt, xs, w, kernels=True: torch.zeros_like(xs))  # a misread
    with pytest.raises(ConfigError, match=r"--cpu-experts always: the CPU's result for an expert in fp32 differs from the CPU's by 100% \(rms\)"):
        moe_local.load(folder, device="cpu", dtype="fp32", expert_slots=3, cpu_experts="always")


def test_cpu_experts_option_is_checked():
    with pytest.raises(ConfigError, match="--cpu-experts 'sometimes'"):
        Options(cpu_experts="sometimes")


def test_bench_reports_the_cpu_channel(tmp_path):
    from moe_local.bench import BenchConfig, bench

    config = BenchConfig(preset="tiny", device="cpu", expert_slots=8, prompt_tokens=16, new_tokens=4, peer_layers=0,
                         cpu_experts="always", policies=("layer-lru",), pageable=True)
    result = bench(config)
    assert result["same_tokens_in_every_run"] and result["host_memory"]["pinned_bytes"] == 0
    for run in result["runs"]:
        assert run["cpu_experts"] == "always" and run["experts_on_cpu"] > 0 and run["cpu_busy_ms_per_layer"] > 0
        copies = run["misses_per_token"] - run["experts_on_cpu_per_token"] + run["prefetched_per_token"]
        assert run["h2d_bytes_per_token"] == pytest.approx(copies * result["plan"]["expert_bytes"])


def test_run_says_where_misses_ran(tiny):
    from conftest import moe_local_cli

    folder, _ = tiny
    out = moe_local_cli("run", str(folder), "-p", "hello", "-n", "4", "--raw", "--device", "cpu", "--expert-slots", "3",
                        "--cpu-experts", "always")
    assert out.returncode == 0, out.stderr
    assert "misses run on the CPU" in out.stderr and "--cpu-experts always" in out.stderr
    assert "--cpu-experts" in moe_local_cli("run", "--help").stdout


@pytest.mark.gpu
def test_on_cuda_fp32_tokens_do_not_depend_on_where_misses_run(tiny):
    """Not yet run on a GPU: the CPU channel beside real copies, fp32 tokens identical, logits close."""
    folder, _ = tiny
    ids = [1, 17, 99, 250, 31, 7, 64]
    never = moe_local.load(folder, device="cuda", dtype="fp32", expert_slots=3, cpu_experts="never")
    always = moe_local.load(folder, device="cuda", dtype="fp32", expert_slots=3, cpu_experts="always")
    auto = moe_local.load(folder, device="cuda", dtype="fp32", expert_slots=3, cpu_experts="auto")
    assert auto.experts.speeds is not None and auto.experts.speeds.copy_ms > 0
    want = never.logits(ids)
    for engine in (always, auto):
        assert torch.allclose(engine.logits(ids), want, atol=1e-4 * want.abs().max().item())
        assert greedy_with(engine, ids, 16) == greedy_with(never, ids, 16)
    assert always.experts.stats.as_dict()["experts_on_cpu"] > 0

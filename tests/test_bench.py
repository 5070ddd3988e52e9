"""`moe-local bench` on the tiny preset: every field the protocol asks for, consistent with each other."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import moe_local_cli
from moe_local import native
from moe_local.bench import BenchConfig, bench, random_model, random_store
from moe_local.budget import plan_memory
from moe_local.config import PRESETS, ModelConfig
from moe_local.engine import Engine, Options
from moe_local.errors import ConfigError
from moe_local.experts.formats import make_format

TINY = ["--preset", "tiny", "--device", "cpu", "--expert-slots", "8", "--prompt-tokens", "24", "--new-tokens", "6",
        "--peer-layers", "1", "--peer-tokens", "2"]


@pytest.fixture(scope="module")
def result() -> dict:
    config = BenchConfig(preset="tiny", device="cpu", expert_slots=8, prompt_tokens=24, new_tokens=6, peer_layers=1, peer_tokens=2)
    return json.loads(json.dumps(bench(config)))  # what the command prints must be plain JSON


def test_bench_reports_every_figure_of_the_protocol(result):
    for key in ("decode_tok_per_s", "prefill_tok_per_s", "hit_rate", "prefetch_recall", "h2d_bytes_per_token",
                "experts_on_cpu", "bound_tok_per_s", "efficiency", "speedup_vs_peer_per_layer", "policy", "best_policy"):
        assert result[key] is not None, key
    assert {"h2d_gb_per_s", "device_expert_ms", "cpu_expert_ms"} <= set(result["channels"])
    assert result["peer"]["layers"] == 1 and result["peer"]["ms_per_layer"] > 0
    assert result["plan"]["expert_slots"] == 8 and result["config"]["n_layers"] == 4
    assert result["machine"]["torch"] == torch.__version__
    assert result["machine"]["cpu_kernels"] == (native.unavailable() or "built")


def test_each_policy_and_prefetch_is_run_and_the_tokens_do_not_depend_on_them(result):
    assert [(run["policy"], run["prefetch"]) for run in result["runs"]] == [
        ("layer-lru", True), ("lru", True), ("layer-lru", False)]
    assert result["same_tokens_in_every_run"] is True
    assert result["policy"] == "layer-lru" and result["best_policy"] in ("layer-lru", "lru")


def test_bench_figures_agree_with_each_other(result):
    expert_bytes = result["plan"]["expert_bytes"]
    for run in result["runs"]:
        copies = run["misses_per_token"] + run["prefetched_per_token"]
        assert run["h2d_bytes_per_token"] == pytest.approx(copies * expert_bytes)
        assert 0 <= run["hit_rate"] <= 1
        assert 0 <= run["prefetch_recall"] <= 1 if run["prefetch"] else run["prefetch_recall"] is None
        bound_s = run["h2d_bytes_per_token"] / (result["channels"]["h2d_gb_per_s"] * 1e9)
        assert run["bound_tok_per_s"] == pytest.approx(1 / bound_s)
        assert run["efficiency"] == pytest.approx(run["decode_tok_per_s"] / run["bound_tok_per_s"])
        assert 0 < run["sync_wait_ms_per_layer"] < run["decode_ms_per_layer"]
        # the split of a layer's time: host + wait is the measured time; copy and compute are its bytes and
        # expert runs at the channels' speeds (every requested expert ran on the device: none on the CPU here)
        assert run["host_ms_per_layer"] + run["wait_ms_per_layer"] == pytest.approx(run["decode_ms_per_layer"])
        assert run["wait_ms_per_layer"] == pytest.approx(run["sync_wait_ms_per_layer"] + run["cpu_wait_ms_per_layer"])
        assert run["host_ms_per_layer"] > 0
        assert run["copy_ms_per_layer"] == pytest.approx(bound_s * 1e3 / result["config"]["n_layers"])
        assert run["experts_on_cpu"] == 0
        runs = run["compute_ms_per_layer"] * result["config"]["n_layers"] / result["channels"]["device_expert_ms"]
        assert runs == pytest.approx(4 * 2)  # per token: the tiny preset's 4 layers, top-2
    main = result["runs"][0]
    assert result["speedup_vs_peer_per_layer"] == pytest.approx(result["peer"]["ms_per_layer"] / main["decode_ms_per_layer"])
    assert result["host_memory"]["pageable_bytes"] == result["plan"]["total_experts"] * expert_bytes


def test_bench_options_are_checked():
    with pytest.raises(ConfigError, match="eviction policy 'mru'"):
        BenchConfig(policies=("mru",))
    with pytest.raises(ConfigError, match="--new-tokens"):
        BenchConfig(new_tokens=0)


def test_bench_command_prints_one_json_object_and_a_table_on_stderr():
    result = moe_local_cli("bench", *TINY, "--no-compare-prefetch", "--policy", "lru")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert [run["policy"] for run in out["runs"]] == ["lru"] and out["policy"] == "lru"
    assert out["config"]["prompt_tokens"] == 24 and out["peer"]["tokens"] == 2
    assert "decode tok/s" in result.stderr and "peer (transformers + accelerate offload, 1 layers)" in result.stderr
    run = out["runs"][0]
    split = (f"lru, prefetch on: {run['decode_ms_per_layer']:.2f} ms = host {run['host_ms_per_layer']:.2f} + wait "
             f"{run['wait_ms_per_layer']:.2f}; copy {run['copy_ms_per_layer']:.2f}, compute {run['compute_ms_per_layer']:.2f}")
    assert split in result.stderr


def test_bench_with_int8_attention_plans_and_runs_it(result):
    out = moe_local_cli("bench", *TINY, "--no-compare-prefetch", "--policy", "lru", "--peer-layers", "0", "--resident-dtype", "int8", "-q")
    assert out.returncode == 0, out.stderr
    small = json.loads(out.stdout)
    assert small["config"]["resident_dtype"] == "int8" and small["same_tokens_in_every_run"]
    assert small["plan"]["resident_bytes"] < result["plan"]["resident_bytes"]


def test_bench_on_the_cpu_without_slots_runs_the_experts_in_place_once():
    out = moe_local_cli("bench", "--preset", "tiny", "--device", "cpu", "--prompt-tokens", "8", "--new-tokens", "3", "--peer-layers", "0")
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)["runs"]
    assert len(runs) == 1 and runs[0]["cpu_experts"] == "in place" and runs[0]["h2d_bytes_per_token"] == 0
    assert "no eviction policy or prefetch applies" in out.stderr


def test_bench_batch_decodes_sequences_together_against_one_in_the_plan_with_a_cache_each():
    out = moe_local_cli("bench", *TINY, "--no-compare-prefetch", "--policy", "lru", "--peer-layers", "0", "--batch", "3")
    assert out.returncode == 0, out.stderr
    b = json.loads(out.stdout)["batch"]
    assert b["sequences"] == 3 and b["speedup"] == pytest.approx(b["together"]["tok_per_s"] / b["one"]["tok_per_s"])
    assert b["expert_slots"] == 8 and b["together"]["h2d_bytes_per_step"] >= b["one"]["h2d_bytes_per_step"] > 0
    assert f"3 sequences together: {b['together']['tok_per_s']:.2f} tok/s in all" in out.stderr


@pytest.mark.parametrize("bad, message", [
    (["--layers", "0"], "--layers must be at least 1"),
    (["--policy", "mru"], "unknown eviction policy 'mru'"),
    (["--preset", "gpt"], "unknown preset 'gpt'"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--batch", "0"], "--batch"),
    (["--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
])
def test_bench_refuses_bad_options_in_one_line(bad, message):
    result = moe_local_cli("bench", "--device", "cpu", "--preset", "tiny", *bad)
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_random_weights_route_close_to_uniformly_in_every_layer():
    """What bench's targets assume. With every weight at transformers' 0.02 the residual stream soon holds
    the same direction for every token and they all route to a few experts (17 to 47 distinct experts per
    layer here, falling with depth); bench's initialisation keeps each layer near uniform."""
    cfg = ModelConfig.from_hf({**PRESETS["tiny"], "num_local_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 8, "vocab_size": 512})
    cpu, fp32 = torch.device("cpu"), torch.float32
    fmt = make_format("fp32", cfg, fp32, "cpu")
    gen = torch.Generator().manual_seed(0)
    store, model = random_store(cfg, fmt, fp32, cpu, gen, 0, None), random_model(cfg, fp32, cpu, gen)
    engine = Engine(model, store, plan_memory(cfg, fp32, cpu, 48, 512, expert_bytes=fmt.expert_bytes), Options(device="cpu"), 48)
    seen, experts = [set() for _ in range(cfg.n_moe_layers)], engine.experts

    def recording(layer, x, weights, indices):
        seen[layer].update(indices.flatten().tolist())
        return experts(layer, x, weights, indices)

    engine.experts = recording
    tokens = torch.randint(cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.prefill(tokens[:8])
    for token in tokens[8:]:
        engine.decode_one(token)
    # 40 tokens x 8 choices over 64 experts: uniform routing meets ~63.6 of them
    assert min(len(s) for s in seen) >= 56, [len(s) for s in seen]

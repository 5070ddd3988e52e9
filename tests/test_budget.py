"""Budget planning arithmetic on published geometries (no weights needed)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import moe_local

from conftest import moe_local_cli
from moe_local.budget import SNAPSHOTS, check_beside_experts, host_bytes_needed, plan_memory, plan_report, resident_bytes
from moe_local.checkpoint import Checkpoint
from moe_local.config import preset_config
from moe_local.errors import BudgetError, ConfigError
from moe_local.experts.formats import choose_format

CUDA = torch.device("cuda")  # only a name here: nothing is allocated
GiB = 2**30


def test_mixtral_8x7b_geometry_has_the_published_parameter_count():
    cfg = preset_config("mixtral-8x7b")
    experts = cfg.n_layers * cfg.n_experts * cfg.expert_numel
    assert round((cfg.resident_numel() + experts) / 1e9, 1) == 46.7  # "Mixtral 8x7B: 46.7B total parameters"
    assert cfg.expert_numel * 2 == 352_321_536  # one bf16 expert, as in ../shared/BENCHMARKS.md
    assert round(preset_config("mixtral-8x22b").resident_numel() / 1e9 + 56 * 8 * 3 * 6144 * 16384 / 1e9) == 141


@pytest.mark.parametrize("budget, slots", [("12GiB", 25), ("24GiB", 62)])
def test_plan_for_mixtral_8x7b_on_a_gpu_budget(budget, slots):
    cfg = preset_config("mixtral-8x7b")
    plan = plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, budget)
    report = plan_report(cfg, plan, 4096)
    embeddings = 32000 * 4096 * 2  # in host RAM beside a GPU
    assert report["resident_bytes"] == 2 * cfg.resident_numel() - embeddings and report["host_resident_bytes"] == embeddings
    assert report["kv_bytes"] == 512 * 2**20  # 32 layers x (K, V) x 4096 positions x 8 heads x 128 x 2 bytes
    assert report["expert_slots"] == slots
    assert plan.fixed_bytes + slots * plan.expert_bytes <= int(budget[:2]) * GiB < plan.fixed_bytes + (slots + 1) * plan.expert_bytes
    assert report["experts_per_layer"] == slots / 32
    assert report["expected_hit_rate_uniform"] == slots / 256
    misses = (1 - slots / 256) * 64  # 32 layers x top-2, each resident with probability slots / 256
    assert report["expected_h2d_bytes_per_token_uniform"] == round(misses * 352_321_536)
    assert report["host_bytes_needed"] == 256 * 352_321_536 + embeddings  # on a GPU the experts and the embeddings
    assert report["host_bytes_available"] > 0


def test_int8_and_int4_attention_take_fewer_attention_bytes_and_buy_slots():
    cfg = preset_config("mixtral-8x7b")
    dense = plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, "12GiB")
    int8 = plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, "12GiB", attention="int8")
    int4 = plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, "12GiB", attention="int4")
    attention = 32 * (4096 * 6144 + 4096 * 4096)  # wqkv [(32 + 2 x 8) x 128, 4096] and wo [4096, 4096] per layer
    scales = 32 * (6144 + 4096) * 2  # one bf16 scale per output channel
    assert dense.resident_bytes - int8.resident_bytes == attention - scales
    groups = attention // 128 * 4  # a bf16 scale and zero per 128 weights of a row
    assert dense.resident_bytes - int4.resident_bytes == attention * 2 - attention // 2 - groups
    assert round(int8.resident_bytes / dense.resident_bytes, 2) == 0.55
    assert round(int4.resident_bytes / dense.resident_bytes, 2) == 0.33
    assert (dense.expert_slots, int8.expert_slots, int4.expert_slots) == (25, 29, 31)  # bf16 experts of 336 MiB


def test_int8_and_int4_take_the_dense_mlps_and_shared_experts_too():
    cfg = preset_config("gemma-4-26b-a4b")  # a dense GeGLU MLP of 2112 beside the experts in each of 30 layers
    mlp, rows = 30 * 3 * 2816 * 2112, 30 * (2 * 2112 + 2816)  # w13 [2 x 2112, 2816] and w2 [2816, 2112] per layer
    attention, attention_rows = cfg.projection_numel, cfg.projection_rows
    dense = resident_bytes(cfg, torch.bfloat16)
    int8, int4 = (resident_bytes(cfg, torch.bfloat16, dtype) for dtype in ("int8", "int4"))
    assert dense - int8 == (attention + mlp) - 2 * (attention_rows + rows)  # a byte a weight and a bf16 scale a row
    # groups of 128 for the attention, of 64 for the MLPs (2112 = 33 x 64), a bf16 scale and zero each
    assert dense - int4 == 2 * (attention + mlp) - (attention + mlp) // 2 - attention // 128 * 4 - mlp // 64 * 4
    assert (round(dense / GiB, 2), round(int8 / GiB, 2), round(int4 / GiB, 2)) == (4.46, 2.93, 2.23)  # attention alone: 3.43, 2.94
    qwen = preset_config("qwen3.6-35b-a3b")  # a shared expert of 512 in each of 40 layers, beside its sigmoid gate
    assert qwen.mlp_matrices == 40 * [(1024, 2048), (2048, 512)]
    # the gate, one row, stays bf16: what int8 takes off is the attention's and the shared experts' matrices
    shared = 40 * 3 * 2048 * 512
    assert resident_bytes(qwen, torch.bfloat16) - resident_bytes(qwen, torch.bfloat16, "int8") == (
        qwen.projection_numel + shared - 2 * (qwen.projection_rows + 40 * (1024 + 2048)))


def test_on_the_cpu_quantized_attention_brings_lm_head_to_int8_unless_it_is_the_embeddings_table():
    cfg = preset_config("gpt-oss-20b")  # a 201,088-token vocabulary: lm_head is 1.2 GB in bf16
    head = cfg.vocab_size * cfg.dim * 2
    for attention in ("int8", "int4"):
        cpu = resident_bytes(cfg, torch.bfloat16, attention, device_type="cpu")
        cuda = resident_bytes(cfg, torch.bfloat16, attention, device_type="cuda")
        assert cuda - cpu == head - (cfg.vocab_size * cfg.dim + cfg.vocab_size * 2)  # one byte a weight, a bf16 scale a row
    tied = replace(cfg, tie_word_embeddings=True)
    assert resident_bytes(tied, torch.bfloat16, "int8", device_type="cpu") == resident_bytes(tied, torch.bfloat16, "int8", device_type="cuda")
    assert resident_bytes(cfg, torch.bfloat16, device_type="cpu") == resident_bytes(cfg, torch.bfloat16, device_type="cuda")


def test_int4_attention_refuses_shapes_its_packing_cannot_take():
    cfg = preset_config("tiny")
    with pytest.raises(ConfigError, match="int4 on CPU needs matrices of a multiple of 16 rows by a multiple of 32 columns, and this model has one of 24 x 256"):
        resident_bytes(replace(cfg, n_heads=1, n_kv_heads=1, head_dim=8), torch.bfloat16, "int4", device_type="cpu")


def test_beside_a_gpu_the_token_embeddings_live_in_host_ram_unless_lm_head_shares_them():
    untied = preset_config("qwen3-30b-a3b")
    tied = replace(untied, tie_word_embeddings=True)
    embeddings = 151936 * 2048 * 2
    apart, shared = (plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, "8GiB", expert_bytes=2**20) for cfg in (untied, tied))
    assert (apart.host_resident_bytes, shared.host_resident_bytes) == (embeddings, 0)
    assert apart.resident_bytes == 2 * untied.resident_numel() - embeddings  # lm_head on the device, the table not
    assert shared.resident_bytes == 2 * tied.resident_numel()  # one table, on the device, for both
    on_cpu = plan_memory(untied, torch.bfloat16, torch.device("cpu"), 4096, 512)
    assert on_cpu.host_resident_bytes == 0 and on_cpu.resident_bytes == 2 * untied.resident_numel()  # all in host RAM there


def test_on_the_cpu_everything_is_counted_in_host_ram():
    cfg = preset_config("tiny")
    plan = plan_memory(cfg, torch.float32, torch.device("cpu"), 256, 512)
    assert plan.expert_slots == 0 and plan.in_place  # the CPU default: every expert in place, no slots
    assert host_bytes_needed(plan) == plan.total_experts * plan.expert_bytes + plan.fixed_bytes + plan.slot_bytes


def test_a_hybrids_snapshots_are_host_ram_of_every_sequence_and_other_families_keep_none():
    hybrid, plain = preset_config("qwen3.5-397b-a17b"), preset_config("qwen3-30b-a3b")
    state = hybrid.sequence_state_bytes(torch.bfloat16)
    assert state == 45 * ((2 * 16 * 128 + 64 * 128) * 3 * 2 + 64 * 128 * 128 * 4)  # 183.2 MiB: docs/architecture.md
    for device in (CUDA, torch.device("cpu")):
        one, served = (plan_memory(hybrid, torch.bfloat16, device, 4096, 512, "64GiB", sequences=n) for n in (1, 8))
        assert (one.snapshot_bytes, served.snapshot_bytes) == (SNAPSHOTS * state, 8 * SNAPSHOTS * state)  # 5.72 GiB served
        assert served.beside_store_bytes - served.snapshot_bytes == (served.host_resident_bytes if device == CUDA
                                                                     else served.fixed_bytes + served.slot_bytes)
        assert host_bytes_needed(served) == served.total_experts * served.expert_bytes + served.beside_store_bytes
        assert plan_report(hybrid, served, 4096)["snapshot_bytes"] == served.snapshot_bytes
        none = plan_memory(plain, torch.bfloat16, device, 4096, 512, "64GiB", sequences=8)
        assert none.snapshot_bytes == 0 and plan_report(plain, none, 4096)["snapshots_per_sequence"] == 0


def test_a_refusal_names_the_snapshots_where_they_tip_it():
    cfg = preset_config("qwen3.6-35b-a3b")
    plan = plan_memory(cfg, torch.bfloat16, torch.device("cpu"), 4096, 512, sequences=8)
    tipped = r"the snapshots of the linear-attention layers' state tip it \(4 per sequence x 8 sequences, 1\.92 GiB\): fewer --parallel rows"
    with pytest.raises(BudgetError, match=r"the rest of the model beside the experts on the CPU needs .*" + tipped):
        check_beside_experts(plan, 4096, None, available=plan.fixed_bytes + 1)
    check_beside_experts(plan, 4096, None, available=plan.fixed_bytes + plan.snapshot_bytes)  # fits: no error
    with pytest.raises(BudgetError, match=r"the resident weights need") as refused:  # too large with or without them
        check_beside_experts(plan, 4096, None, available=plan.resident_bytes - 1)
    assert "snapshots" not in str(refused.value)
    int4 = cfg.n_moe_layers * cfg.n_experts * choose_format("int4", cfg, torch.bfloat16, "cpu", None)[0].expert_bytes
    beside = plan.beside_store_bytes
    room = int((int4 + beside - plan.snapshot_bytes / 2) / 0.85)  # int4 would fit without them, not with them
    with pytest.raises(BudgetError, match=r"any format: .*workspace, the snapshots of the linear-attention layers' state; .*shows them\); " + tipped):
        choose_format("auto", cfg, torch.bfloat16, "cpu", None, beside, available=room, sequences=8)


def test_a_budget_below_the_resident_part_says_the_minimum():
    cfg = preset_config("mixtral-8x7b")
    with pytest.raises(BudgetError, match=r"too small: .* need at least 3\.82 GiB"):
        plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, "2GiB")


def test_presets_and_layer_overrides():
    assert preset_config("mixtral-8x7b", 2).n_layers == 2
    with pytest.raises(ConfigError, match="unknown preset 'gpt'"):
        preset_config("gpt")
    with pytest.raises(ConfigError, match="at least 1"):
        preset_config("tiny", 0)


def test_plan_command_shows_the_table_and_json_without_loading(tiny):
    folder, _ = tiny
    table = moe_local_cli("plan", "--preset", "mixtral-8x7b", "--gpu-memory", "24GiB", "-c", "4096", "--experts-dtype", "bf16")
    assert table.returncode == 0, table.stderr
    for row in ("resident weights", "KV cache (4096 tokens)", "62 x 336.00 MiB", "experts per layer that fit",
                "host RAM for the experts", "24.2 % under uniform routing", "250.00 MiB, in host RAM", "decode bound by copies"):
        assert row in table.stdout, row
    out = json.loads(moe_local_cli("plan", str(folder), "--device", "cpu", "--expert-slots", "5", "--json").stdout)
    assert out["model"] == str(folder) and out["expert_slots"] == 5 and out["device"] == "cpu"
    assert out["total_experts"] == 24 and out["expert_bytes"] == Checkpoint(folder).config.expert_numel * 4
    assert out["experts_format"] == "fp32" and out["formats"]["int4"]["expert_bytes"] < out["formats"]["int8"]["expert_bytes"]
    int4 = json.loads(moe_local_cli("plan", "--preset", "mixtral-8x7b", "--gpu-memory", "12GiB", "--experts-dtype", "int4", "--json").stdout)
    assert int4["experts_format"] == "int4-g128-cuda" and int4["expert_bytes"] == 93_585_408  # 4.25 bits per weight, aligned
    assert int4["expert_slots"] > 3 * int4["formats"]["bf16"]["expert_slots"]
    args = ("plan", "--preset", "mixtral-8x7b", "--gpu-memory", "12GiB", "--experts-dtype", "int4", "--resident-dtype", "int8")
    small = json.loads(moe_local_cli(*args, "--json").stdout)
    assert small["resident_dtype"] == "int8" and small["resident_bytes"] < 0.6 * int4["resident_bytes"]
    assert small["expert_slots"] > int4["expert_slots"] and small["formats"]["bf16"]["resident_bytes"] == small["resident_bytes"]
    assert "(attention in int8)" in moe_local_cli(*args).stdout
    cpu = ("plan", "--preset", "gpt-oss-20b", "--device", "cpu", "--resident-dtype", "int4")
    assert json.loads(moe_local_cli(*cpu, "--json").stdout)["lm_head_int8"] and "(attention in int4, lm_head in" in moe_local_cli(*cpu).stdout
    gemma = ("plan", "--preset", "gemma-4-26b-a4b", "--device", "cpu", "--resident-dtype", "int4")  # its dense MLPs too; lm_head is tied
    assert "2.23 GiB (attention and MLPs in int4)" in moe_local_cli(*gemma).stdout


def test_plan_on_the_cpu_without_a_budget_is_what_the_load_runs_every_expert_in_place(tiny):
    folder, _ = tiny
    out = json.loads(moe_local_cli("plan", str(folder), "--device", "cpu", "--json").stdout)
    assert out["in_place"] and out["expert_slots"] == out["slot_bytes"] == 0
    assert out["expected_hit_rate_uniform"] == 1 and out["expected_h2d_bytes_per_token_uniform"] == 0
    assert all(f["in_place"] for f in out["formats"].values())
    table = moe_local_cli("plan", str(folder), "--device", "cpu").stdout
    assert "none: no slots, no copies" in table and "every expert runs where it lies" in table
    engine = moe_local.load(folder, device="cpu")
    assert engine.plan.in_place and not hasattr(engine.experts, "cache")


def test_plan_command_errors_are_one_line():
    for args, message, status in [
        (["--preset", "mixtral-8x7b", "--gpu-memory", "2GiB", "--experts-dtype", "bf16"], "need at least 3.82 GiB", 1),
        (["--preset", "mixtral-8x7b", "--gpu-memory", "lots"], "cannot read memory size 'lots'", 2),  # usage errors: 2
        (["some/model", "--preset", "tiny"], "not both", 2),
        (["--preset", "mixtral-8x7b", "--gpu-memory", "12GiB", "--resident-dtype", "int2"], "unknown resident dtype 'int2' (choose from auto, int8, int4)", 2),
    ]:
        result = moe_local_cli("plan", *args)
        assert result.returncode == status and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    if not torch.cuda.is_available():
        result = moe_local_cli("plan", "--preset", "tiny")
        assert result.returncode == 2 and "give --gpu-memory SIZE" in result.stderr

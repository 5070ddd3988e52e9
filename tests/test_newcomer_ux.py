"""What a newcomer still tripped over (issue 25): errors that blame what is at fault and name the fix,
numbers on `--device cpu` that agree with each other, and small things that should do what a user expects."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import moe_local
from moe_local.budget import check_beside_experts, plan_memory
from moe_local.config import ModelConfig, preset_config
from moe_local.errors import BudgetError, ConfigError
from moe_local.params import SamplingParams, max_new_tokens_default
from test_cli import assert_one_line_error, cli_in_process

DEMO = Path(moe_local.__file__).parent / "demo"
CUDA = torch.device("cuda")
GiB = 2**30


@pytest.fixture
def never_loads(monkeypatch):
    """Loading the model fails the test: what is checked must fail before it."""
    from moe_local.engine import Engine

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Engine, "from_folder", load)


# Point 5: an error blames what is at fault and names the fix.


def test_a_context_too_long_for_host_ram_blames_the_context_not_the_experts():
    with pytest.raises(BudgetError, match=r"^a context of 100000000 tokens needs [\d.]+ GiB of host RAM on the CPU \(KV cache "
                                          r"[\d.]+ GiB, a prefill chunk's workspace [\d.]+ GiB\), more than the [\d.]+ GiB available: lower --ctx-size$"):
        moe_local.load(DEMO, device="cpu", ctx_size=100_000_000)


def test_resident_weights_too_large_for_host_ram_name_the_resident_dtype():
    plan = plan_memory(preset_config("deepseek-v3"), torch.bfloat16, torch.device("cpu"), 4096, 512)
    with pytest.raises(BudgetError, match=r"^the resident weights need 31\.88 GiB of host RAM on the CPU, more than the 16\.00 GiB "
                                          r"available: --resident-dtype int8 or int4 makes them smaller$"):
        check_beside_experts(plan, 4096, None, available=16 * GiB)
    check_beside_experts(plan, 4096, None, available=40 * GiB)  # fits: no error


N = r"\([\d.]+ GiB in all\)"


@pytest.mark.parametrize("preset, budget, fix", [
    ("glm-4.5-air", "8GiB", rf"--resident-dtype int4 {N} would fit$"),
    ("deepseek-v3", "24GiB", rf"--resident-dtype int8 {N} or --resident-dtype int4 {N} would fit$"),
    ("deepseek-v3", "11GiB", r"--resident-dtype int4 with a lower --ctx-size$"),
    ("deepseek-v3", "10GiB", r"the resident weights alone take more, also in int4 \(--resident-dtype int4\)$"),
    ("mixtral-8x7b", "3GiB", rf"--resident-dtype int8 {N} or --resident-dtype int4 {N} would fit, or lower --ctx-size$"),
])
def test_a_budget_too_small_for_the_resident_part_names_the_resident_dtype_that_fits(preset, budget, fix):
    cfg = preset_config(preset)
    with pytest.raises(BudgetError, match=fix):
        plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, budget)
    if "would fit" in fix:  # and it does
        smallest = "int8" if "int8 (" in fix else "int4"
        assert plan_memory(cfg, torch.bfloat16, CUDA, 4096, 512, budget, attention=smallest).expert_slots >= 1


def test_plan_suggests_the_resident_dtype_in_one_line(monkeypatch, capsys):
    result = cli_in_process(monkeypatch, capsys, "plan", "--preset", "glm-4.5-air", "--gpu-memory", "8GiB")
    assert_one_line_error(result, r"a 8\.00 GiB budget is too small: resident weights 12\.25 GiB .* --resident-dtype int4 \(5\.57 GiB in all\) would fit$")


def demo_with_generation_config(folder: Path, **fields) -> Path:
    shutil.copytree(DEMO, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return folder


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_a_bad_generation_config_value_names_the_file_before_the_load(never_loads, monkeypatch, capsys, tmp_path, command):
    folder = demo_with_generation_config(tmp_path / "m", top_p=2)
    args = [command, str(folder), "--device", "cpu"] + (["-p", "hi"] if command == "run" else []) + (["--port", "0"] if command == "serve" else [])
    hint = "fix the file" if command == "serve" else "fix the file, or override it with --top-p"  # serve has no sampling flags
    assert_one_line_error(cli_in_process(monkeypatch, capsys, *args),
                          rf"^error: generation_config.json: top_p must be in \(0, 1\], not 2 \({hint}\)$")


def test_the_flag_replaces_a_bad_generation_config_value(monkeypatch, capsys, tmp_path):
    folder = demo_with_generation_config(tmp_path / "m", top_p=2, temperature="warm")
    result = cli_in_process(monkeypatch, capsys, "run", str(folder), "-p", "def f(", "-n", "2", "--top-p", "0.9", "--temp", "0.5",
                            "--seed", "1", "--device", "cpu", "-q")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    gen = {"top_p": 2, "temperature": "warm", "top_k": 7}
    params = SamplingParams().from_generation_config(gen, {"top_p": 0.9, "temperature": 0.5})
    assert (params.top_p, params.temperature, params.top_k) == (0.9, 0.5, 7)  # the file's other values still count
    with pytest.raises(ConfigError, match=r'^generation_config.json: temperature must be a number, not "warm" \(fix the file\)$'):
        SamplingParams().from_generation_config(gen)


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True])
def test_a_bad_max_new_tokens_in_generation_config_is_named(value):
    with pytest.raises(ConfigError, match=rf"^generation_config.json: max_new_tokens must be a positive integer, not {re_escape(json.dumps(value))} "
                                          r"\(fix the file, or override it with --max-new-tokens\)$"):
        max_new_tokens_default({"max_new_tokens": value}, 256)
    assert max_new_tokens_default({"max_new_tokens": 64.0}, 256) == 64 and max_new_tokens_default({}, 256) == 256


@pytest.mark.parametrize("field, value, says", [
    ("hidden_size", "big", "invalid literal for int()"),
    ("num_attention_heads", 0, "division or modulo by zero"),
    ("vocab_size", None, "not 'NoneType'"),
    ("num_experts_per_tok", [2], "not 'list'"),
    ("rms_norm_eps", "tiny", "could not convert string to float"),
    ("sliding_window", "x", "invalid literal for int()"),
    ("num_local_experts", 8.5, "not a whole number: 8.5"),  # int() would have cut it to 8
    ("num_hidden_layers", 2.25, "not a whole number: 2.25"),
])
def test_a_malformed_config_field_is_named(field, value, says):
    raw = json.loads((DEMO / "config.json").read_text())
    with pytest.raises(ConfigError, match=rf"^config.json has a malformed field '{field}': .*{re_escape(says)}"):
        ModelConfig.from_hf({**raw, field: value})


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# Point 6: on --device cpu the numbers agree with each other.


@pytest.fixture(scope="module")
def in_place():
    return moe_local.load(DEMO, device="cpu", dtype="fp32", ctx_size=128)


def test_experts_in_place_count_runs_not_hits(monkeypatch, capsys):
    result = cli_in_process(monkeypatch, capsys, "run", "-p", "def f(", "-n", "4", "--temp", "0", "--device", "cpu", "--json")
    experts = json.loads(result.stdout)["stats"]["experts"]
    assert experts["hit_rate"] is None and experts["hits"] == experts["misses"] == experts["bytes_copied"] == 0
    assert experts["in_place"] > 0
    assert "expert cache  = none: every expert runs in place from host RAM, 0 bytes copied" in result.stderr


def test_chats_stats_and_info_say_the_experts_run_in_place(in_place):
    from moe_local.chat import ChatSession

    chat = ChatSession(in_place, SamplingParams(temperature=0), max_new_tokens=4)
    chat.ask("def f(")
    list(chat.reply())
    stats, info = chat.stats_text(), chat.info_text()
    assert "expert cache  none: all 32 experts run in place from host RAM, 0 bytes copied" in stats
    assert "% hits" not in stats and "fit in slots" not in stats
    assert "all 32 run in place from host RAM" in info and "in slots" not in info


def test_bench_in_place_is_one_run_without_a_policy_or_prefetch(capsys):
    from moe_local.bench import BenchConfig, bench
    from moe_local.cli import print_bench

    result = bench(BenchConfig(preset="tiny", device="cpu", prompt_tokens=8, new_tokens=4, peer_layers=0))
    [run] = result["runs"]
    assert (run["policy"], run["prefetch"], run["hit_rate"]) == ("in place", False, None)
    # the experts' compute is the runs (4 layers, top-2) at the speed measured for one alone
    assert run["compute_ms_per_layer"] == pytest.approx(2 * result["channels"]["cpu_expert_ms"])
    print_bench(result)
    table = capsys.readouterr().err
    assert "│ in place │      n/a │" in table and "layer-lru" not in table
    assert "one expert alone" in table and "the median of 16 calls" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="says what happens without a CUDA GPU")
def test_gpu_flags_without_a_gpu_say_once_that_none_was_found():
    with pytest.warns(UserWarning, match=r"^no CUDA GPU was found .* --expert-slots makes a pool of expert slots in host RAM") as said:
        engine = moe_local.load(DEMO, expert_slots=4)
    assert len(said) == 1 and engine.device.type == "cpu" and engine.plan.expert_slots == 4  # the pool still stands in for a GPU's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # --device cpu said so: nothing to warn about
        moe_local.load(DEMO, device="cpu", expert_slots=4)


# Point 8: small things a user expects.


@pytest.mark.parametrize("preset, published, counted", [
    ("gpt-oss-20b", 3.6, "active_without_embeddings"), ("gpt-oss-120b", 5.1, "active_without_embeddings"),
    ("mixtral-8x7b", 12.9, "active_per_token"), ("qwen3-30b-a3b", 3.3, "active_per_token"), ("olmoe-1b-7b", 1.3, "active_per_token"),
])
def test_active_parameters_are_counted_both_ways_the_model_cards_count_them(preset, published, counted):
    counts = preset_config(preset).parameter_counts()
    assert counts[counted] / 1e9 == pytest.approx(published, rel=0.02)
    cfg = preset_config(preset)
    assert counts["active_per_token"] - counts["active_without_embeddings"] == cfg.vocab_size * cfg.dim


def test_plans_two_host_ram_figures_agree_beside_a_gpu(monkeypatch, capsys):
    """The experts' line (from choosing their format) and the host RAM line both count the token embeddings,
    which stay in host RAM beside a GPU (they said 22.31 and 22.56 GiB for Mixtral in int4)."""
    result = cli_in_process(monkeypatch, capsys, "plan", "--preset", "mixtral-8x7b", "--gpu-memory", "12GiB", "--experts-dtype", "auto", "--json")
    report = json.loads(result.stdout)
    int4 = report["formats"]["int4"]["host_bytes_needed"]
    assert report["host_resident_bytes"] == 32000 * 4096 * 2 and int4 == 256 * report["formats"]["int4"]["expert_bytes"] + 32000 * 4096 * 2
    if "do not fit" in report["why"]:  # this machine's RAM: the figure the choice quotes is the table's
        assert f"int4 would need {int4 / GiB:.2f} GiB" in report["why"]

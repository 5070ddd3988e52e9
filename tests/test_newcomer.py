"""What a newcomer trips over (issue 14): fast failures before the slow load, messages for a person,
quiet pipes, context limits said out loud, the options llama.cpp and Ollama users expect."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moe_local
from conftest import build_mixtral, moe_local_cli
from moe_local.budget import parse_size
from moe_local.checkpoint import resolve_model_path
from moe_local.errors import BudgetError, MoeLocalError
from moe_local.generate import GenerationStats, SamplingParams, generate, sample
from moe_local.params import max_new_tokens_default
from moe_local.tokenizer import load_tokenizer
from test_cli import assert_one_line_error, cli_in_process

DEMO = Path(moe_local.__file__).parent / "demo"


def test_the_tests_quantized_cache_lives_in_pytests_temporary_folder(tmp_path_factory):
    cache = Path(os.environ["MOE_LOCAL_CACHE"])
    assert cache.is_dir() and cache.is_relative_to(tmp_path_factory.getbasetemp())


def test_a_seed_out_of_range_is_a_message_not_an_overflow():
    with pytest.raises(ValueError, match=r"seed must be a whole number from 0 to 18446744073709551615"):
        SamplingParams(seed=99999999999999999999999)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_or_inf_logits_say_the_weights_may_be_damaged(bad, temperature):
    logits = torch.tensor([0.5, bad, 1.0])
    with pytest.raises(MoeLocalError, match="NaN or infinite logits: its weights may be damaged"):
        sample(logits, [], SamplingParams(temperature=temperature), torch.Generator().manual_seed(0))


def test_an_unseeded_generation_reports_a_seed_that_repeats_it(tiny):
    engine = moe_local.load(tiny[0], device="cpu")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    first = GenerationStats()
    tokens = list(engine.generate([1, 5, 9], 12, params, first))
    assert first.seed is not None and first.as_dict()["seed"] == first.seed
    again = GenerationStats()
    assert list(engine.generate([1, 5, 9], 12, replace(params, seed=first.seed), again)) == tokens
    assert again.seed == first.seed


def test_a_full_context_is_its_own_finish_reason(tiny):
    engine = moe_local.load(tiny[0], device="cpu", ctx_size=16)
    stats = GenerationStats()
    tokens = list(generate(engine, list(range(1, 11)), 100, SamplingParams(temperature=0), set(), stats))
    assert len(tokens) == 16 - 10 + 1 and stats.finish_reason == "context"
    stats = GenerationStats()
    list(generate(engine, list(range(1, 11)), 3, SamplingParams(temperature=0), set(), stats))
    assert stats.finish_reason == "length"


# Point 2: everything the small files and the prompt can tell fails before the experts are read.


@pytest.fixture
def never_loads(monkeypatch):
    """Loading the model fails the test: what is checked must fail before it."""
    from moe_local.engine import Engine

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Engine, "from_folder", load)


def with_chat_template(tiny, folder: Path, template: str) -> Path:
    shutil.copytree(tiny[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def test_a_missing_tokenizer_fails_before_the_load(never_loads, monkeypatch, capsys, tmp_path):
    build_mixtral(tmp_path, tokenizer_dir=None)
    capsys.readouterr()  # what building it printed
    result = cli_in_process(monkeypatch, capsys, "run", str(tmp_path), "-p", "hi", "--device", "cpu")
    assert_one_line_error(result, "no tokenizer")


def test_a_chat_template_that_raises_fails_before_the_load(never_loads, monkeypatch, capsys, tiny, tmp_path):
    folder = with_chat_template(tiny, tmp_path / "m", "{{ raise_exception('this model takes no chat') }}")
    for args in (["run", str(folder), "-p", "hi"], ["chat", str(folder)]):
        result = cli_in_process(monkeypatch, capsys, *args, "--device", "cpu")
        assert_one_line_error(result, "chat template failed: this model takes no chat")


def test_a_prompt_longer_than_the_context_fails_before_the_load(never_loads, monkeypatch, capsys, tiny):
    result = cli_in_process(monkeypatch, capsys, "run", str(tiny[0]), "-p", "word " * 40, "--raw", "-c", "16", "--device", "cpu")
    assert_one_line_error(result, r"the prompt takes \d+ tokens and the context holds 16: shorten it or raise --ctx-size")


@pytest.mark.parametrize("args, stdin", [(["-p", ""], None), ([], ""), ([], "  \n")])
def test_an_empty_prompt_is_an_error(never_loads, monkeypatch, capsys, args, stdin):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((stdin or "").encode())))
    result = cli_in_process(monkeypatch, capsys, "run", *args, "--device", "cpu")
    assert_one_line_error(result, "the prompt is empty")


# Point 6: context limits are said out loud.


def test_a_context_past_the_trained_positions_is_warned_about(never_loads, monkeypatch, capsys):
    result = cli_in_process(monkeypatch, capsys, "run", "-p", "hi", "-c", "100000", "--device", "cpu")
    warning, error = result.stderr.strip().splitlines()
    assert warning == ("warning: --ctx-size 100000 is more than the 1024 positions this model was trained for: "
                       "expect nonsense past them")
    assert "the model was loaded" in error  # a warning, not an error


def test_a_full_context_is_reported_on_stderr_and_in_json():
    """On the demo model, which never writes an end of text."""
    args = ("run", "-p", "def f(x):", "--raw", "-c", "16", "-n", "100", "--temp", "0", "--device", "cpu")
    result = moe_local_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "(stopped: the context of 16 tokens is full; raise --ctx-size for a longer answer)" in result.stderr
    stats = json.loads(moe_local_cli(*args, "--json", "-q").stdout)["stats"]
    assert stats["finish_reason"] == "context" and stats["prompt_tokens"] + stats["generated_tokens"] == 17


# Point 4: messages for a person.


def test_a_seed_too_large_is_one_line(monkeypatch, capsys):
    result = cli_in_process(monkeypatch, capsys, "run", "-p", "hi", "--seed", "99999999999999999999999")
    assert_one_line_error(result, "seed must be a whole number from 0 to 18446744073709551615")


# Point 5: a reader that leaves early.


@pytest.mark.parametrize("args, status", [
    (["run", "-p", "def f(x):", "--raw", "-n", "200", "--device", "cpu", "-q"], 141),  # as a shell reports SIGPIPE
    (["run", "--help"], 1),  # typer's own quiet exit
])
def test_a_closed_pipe_ends_quietly(args, status):
    process = subprocess.Popen([sys.executable, "-m", "moe_local", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if args[-1] != "--help":
        process.stdout.read(1)  # the answer has begun
    process.stdout.close()  # as `| head` does when it has read enough
    stderr = process.stderr.read().decode()
    assert stderr == "" and process.wait() in (0, status)  # 0: it had written everything before the close


# Point 8: sizes, flags and wording.


@pytest.mark.parametrize("text, size", [("1B", 1), ("4096B", 4096), ("1.5GiB", 3 * 2**29), ("12gb", 12 * 10**9), (12, 12)])
def test_memory_sizes_with_a_unit_are_read(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [
    ("12", "memory size '12' has no unit: write 12GiB"),
    ("99999TiB", "memory size '99999TiB' is out of range"),
    ("12 apples", "cannot read memory size '12 apples': unknown unit 'apples'"),
])
def test_memory_sizes_without_a_unit_or_absurd_are_refused(text, message):
    with pytest.raises(BudgetError, match=re.escape(message)):
        parse_size(text)


def test_a_budget_without_a_unit_is_one_line(monkeypatch, capsys):
    result = cli_in_process(monkeypatch, capsys, "plan", "--gpu-memory", "12")
    assert_one_line_error(result, r"has no unit: write 12GiB")


def test_flags_are_shown_as_plain_flags(monkeypatch, capsys):
    help_text = cli_in_process(monkeypatch, capsys, "run", "--help").stdout
    assert re.search(r"--raw\s+Feed the prompt", help_text) and re.search(r"--json\s+Print one JSON", help_text)
    assert "<bool>" not in help_text.split("--help")[0]  # typer's own --help keeps it


def test_plan_on_the_cpu_names_no_slots_given_and_no_pcie_bound():
    result = moe_local_cli("plan", "--device", "cpu", env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "slots given" not in result.stdout and "PCIe" not in result.stdout and "GB/s" not in result.stdout
    assert "every expert runs in place from host RAM by default" in result.stdout
    host_ram = re.search(r"host RAM \(experts \+ the rest\)\s+([\d.]+ MiB) needed", result.stdout).group(1)
    # the same figure run prints, as the experts and what sits beside them on the CPU
    experts, beside = re.search(r"auto: ([\d.]+) MiB of experts \+ ([\d.]+) MiB beside them in host RAM", " ".join(result.stdout.split())).groups()
    assert float(experts) + float(beside) == pytest.approx(float(host_ram.split()[0]), abs=0.011)


def test_the_download_hint_names_the_current_command():
    with pytest.raises(MoeLocalError, match="hf download org/no-such-model"):
        resolve_model_path("org/no-such-model")


# Point 10: the demo model's answers end.


def test_the_model_generation_config_sets_the_default_length(tiny, tmp_path):
    assert max_new_tokens_default(json.loads((DEMO / "generation_config.json").read_text()), 256) == 128
    folder = tmp_path / "m"
    shutil.copytree(tiny[0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    result = moe_local_cli("run", str(folder), "-p", "def f(x):", "--raw", "--temp", "0", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["generated_tokens"] == 5 and stats["finish_reason"] == "length"


# Point 11: quick to answer, quick to smoke-test.


def test_the_command_line_imports_torch_only_for_commands_that_need_it():
    code = "import sys, moe_local.cli; print(sorted({'torch', 'accelerate', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_without_a_gpu_suggests_the_cpu_smoke_test(monkeypatch, capsys):
    result = cli_in_process(monkeypatch, capsys, "bench")
    assert_one_line_error(result, r"no CUDA GPU .* `moe-local bench --preset tiny --device cpu` is a quick smoke test")


def test_the_tiny_bench_is_short_and_quiet():
    result = moe_local_cli("bench", "--preset", "tiny", "--device", "cpu", "--peer-tokens", "1", "--no-compare-prefetch", "--policy", "layer-lru")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)["config"]
    assert (config["prompt_tokens"], config["new_tokens"]) == (64, 32)
    assert "deprecated" not in result.stderr and "warning" not in result.stderr


# Point 13: what llama.cpp and Ollama users expect.


def test_version(monkeypatch, capsys):
    result = cli_in_process(monkeypatch, capsys, "--version")
    assert result.returncode == 0 and result.stdout == f"moe-local {moe_local.__version__}\n"


def test_a_prompt_file_a_stop_string_threads_and_the_seed_used(tiny, tmp_path):
    base = ("run", str(tiny[0]), "--raw", "--temp", "0.7", "-n", "24", "--device", "cpu", "-t", "1")
    (tmp_path / "prompt.txt").write_text("def f(x):")
    free = moe_local_cli(*base, "-f", str(tmp_path / "prompt.txt"), "--json")
    assert free.returncode == 0, free.stderr
    out = json.loads(free.stdout)
    assert out["prompt_tokens"] == load_tokenizer(tiny[0]).encode("def f(x):")
    seed = out["stats"]["seed"]
    assert isinstance(seed, int) and f"seed          = {seed}" in free.stderr  # the seed it drew
    repeated = moe_local_cli(*base, "-p", "def f(x):", "--seed", str(seed), "--json")
    assert json.loads(repeated.stdout)["tokens"] == out["tokens"]  # the seed it reported repeats the run
    # stop strings on a greedy run, whose text does not depend on a seed that may draw unprintable bytes
    greedy = (*base[:3], "--temp", "0", *base[5:])
    text = json.loads(moe_local_cli(*greedy, "-p", "def f(x):", "--json").stdout)["text"]
    stop = next(text[i : i + 3] for i in range(len(text) // 2, 0, -1) if text[i : i + 3].isprintable() and text[i : i + 3].strip())
    stopped = moe_local_cli(*greedy, "-p", "def f(x):", "--stop", "never", "--stop", stop, "--json")
    cut = json.loads(stopped.stdout)
    assert cut["text"] == text[: text.index(stop)] and cut["stats"]["finish_reason"] == "stop"
    streamed = moe_local_cli(*greedy, "-p", "def f(x):", "--stop", stop, "-q")
    assert streamed.stdout == cut["text"] + "\n"


# Point 9: the README's Python example runs.


def test_readme_python_example_runs_on_the_demo_model(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = re.search(r"From Python.*?```python\n(.*?)```", readme, re.S).group(1)  # the library example
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text, last = result.stdout.rstrip("\n").rsplit("\n", 1)
    assert len(text.strip()) > 20 and last.split()[0] in ("length", "stop")


def test_the_docs_link_only_to_files_in_the_repository():
    root = Path(__file__).parent.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text, doc
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative links, anchors dropped
            assert (doc.parent / target).exists(), (doc.name, target)

"""The command line contract: `moe-local run ... --json` and one clear line for every error, usage errors too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moe_local
from conftest import build_mixtral, moe_local_cli
from moe_local.cli import main
from moe_local.generate import SamplingParams
from moe_local.tokenizer import load_tokenizer

PROMPT = "def parse_args(argv):"


def run_json(folder, *extra: str) -> dict:
    result = moe_local_cli(
        "run", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0",
        "--raw", "--json", "--device", "cpu", *extra,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_run_json_contract(tiny):
    folder, _ = tiny
    out = run_json(folder, "--expert-slots", "3")
    tokenizer = load_tokenizer(folder)
    assert out["prompt_tokens"] == tokenizer.encode(PROMPT)
    assert out["prompt_tokens"][0] == tokenizer.bos_id
    engine = moe_local.load(folder, device="cpu")
    assert out["tokens"] == list(engine.generate(out["prompt_tokens"], 12, SamplingParams(temperature=0)))
    assert out["text"] == tokenizer.decode(out["tokens"])
    stats = out["stats"]
    assert stats["generated_tokens"] == len(out["tokens"])
    assert stats["memory_plan"]["expert_slots"] == 3
    assert {"hit_rate", "prefetch_recall", "bytes_copied", "per_layer"} <= set(stats["experts"])


def test_run_output_is_the_same_for_any_budget_and_policy(tiny):
    folder, _ = tiny
    few = run_json(folder, "--expert-slots", "1", "--no-prefetch")
    budget = run_json(folder, "--gpu-memory", "64MiB")
    global_lru = run_json(folder, "--expert-slots", "4", "--policy", "lru")
    assert budget["stats"]["memory_plan"]["expert_slots"] == 24
    assert few["tokens"] == budget["tokens"] == global_lru["tokens"]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_run_with_quantized_attention_says_so_and_plans_for_it(tiny, dtype):
    folder, _ = tiny
    result = moe_local_cli("run", str(folder), "-p", PROMPT, "-n", "4", "--raw", "--json", "--device", "cpu", "--resident-dtype", dtype)
    assert result.returncode == 0, result.stderr
    assert f"attention weights in {dtype}, lm_head in int8 (--resident-dtype {dtype})" in result.stderr
    plan = json.loads(result.stdout)["stats"]["memory_plan"]
    assert plan["resident_bytes"] < run_json(folder)["stats"]["memory_plan"]["resident_bytes"]


def test_run_streams_the_decoded_text_to_stdout(tiny):
    folder, _ = tiny
    want = run_json(folder)
    result = moe_local_cli("run", str(folder), "-p", PROMPT, "-n", "12", "--temp", "0", "--raw", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == want["text"] + "\n"
    assert "prompt eval" in result.stderr and "expert cache" in result.stderr


def test_run_reads_the_prompt_from_stdin(tiny):
    folder, _ = tiny
    want = run_json(folder)
    result = moe_local_cli("run", str(folder), "-n", "12", "--temp", "0", "--raw", "--json", "--device", "cpu", "-q",
                           input=PROMPT)
    assert json.loads(result.stdout)["tokens"] == want["tokens"]
    assert result.stderr == ""


def test_console_script_is_installed():
    script = shutil.which("moe-local")
    assert script, "pip install -e . should put moe-local on PATH"
    result = subprocess.run([script, "run", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--gpu-memory" in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]


def cli_error(*args: str) -> subprocess.CompletedProcess:
    return moe_local_cli("run", *args, "--prompt", "hi", "--device", "cpu", "-q")


def test_missing_model_path_is_one_line(tmp_path):
    assert_one_line_error(cli_error(str(tmp_path / "nope")), "does not exist")


def test_truncated_shard_is_one_line(tiny_sharded, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sharded[0], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_one_line_error(cli_error(str(folder)), f"shard {shard.name} is truncated")


def test_missing_tokenizer_is_one_line(tmp_path):
    build_mixtral(tmp_path, tokenizer_dir=None)
    assert_one_line_error(cli_error(str(tmp_path)), "no tokenizer")


def test_budget_too_small_says_the_minimum(tiny):
    assert_one_line_error(cli_error(str(tiny[0]), "--gpu-memory", "10KiB"), "too small.*need at least")


def test_unreadable_budget_string_is_one_line(tiny):
    assert_one_line_error(cli_error(str(tiny[0]), "--gpu-memory", "lots"), "cannot read memory size 'lots'")


def test_negative_temperature_is_one_line(tiny):
    assert_one_line_error(cli_error(str(tiny[0]), "--temperature", "-1"), "temperature must be >= 0")


def test_debug_shows_the_traceback(tmp_path):
    result = moe_local_cli("run", str(tmp_path / "nope"), "--prompt", "hi", "--device", "cpu", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.gpu
def test_run_on_cuda_gives_the_cpu_tokens(tiny):
    folder, _ = tiny
    cpu = run_json(folder, "--expert-slots", "3")
    result = moe_local_cli("run", str(folder), "--prompt", PROMPT, "-n", "12", "--temp", "0", "--raw", "--json",
                           "--device", "cuda", "--expert-slots", "3")
    assert json.loads(result.stdout)["tokens"] == cpu["tokens"]


def readme_commands() -> list[str]:
    """The shell commands in the README's "Use" section, in order."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    use = readme.split("## Use", 1)[1]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", use, re.S)]


def test_readme_first_command_runs_the_demo_model_verbatim():
    command = readme_commands()[0]
    assert command.startswith("moe-local run")
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 20  # the demo model wrote something
    assert "demo model" in result.stderr and "generation" in result.stderr


def test_readme_test_command_is_what_ci_runs():
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def cli_in_process(monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """`moe-local ARGS` through the same `main()`, without starting Python (a usage error fails before any load)."""
    monkeypatch.setattr(sys, "argv", ["moe-local", *args])
    with pytest.raises(SystemExit) as exit:
        main()
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit.value.code, out, err)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["run", "--temp", "-1"], "temperature must be >= 0"),
        (["run", "-n", "-5"], r"Invalid value for '--max-new-tokens' / '-n'.*try 'moe-local run --help'"),
        (["run", "--top-p", "2"], r"top-p must be in \(0, 1\]"),
        (["run", "--top-k", "-1"], "top-k must be >= 0"),
        (["run", "--temp", "hot"], "Invalid value for '--temperature'"),
        (["run", "--bogus"], "No such option: --bogus"),
        (["chat", "--min-p", "1.5"], r"min-p must be in \[0, 1\]"),
        (["chat", "--repeat-penalty", "0"], "repeat-penalty must be > 0"),
        (["chat", "-n", "0"], "Invalid value for '--max-new-tokens'"),
        (["run", "-n", "0"], "Invalid value for '--max-new-tokens'"),  # as chat's /set max_new_tokens 0: nothing to generate
        (["chat", "--dtype", "int4"], "unknown dtype 'int4'"),
        (["chat", "--resident-dtype", "int2"], r"unknown resident dtype 'int2' \(choose from auto, int8, int4\)"),
        (["info", "/no/such/model"], "does not exist"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_bad_arguments_are_one_line(monkeypatch, capsys, args, pattern):
    result = cli_in_process(monkeypatch, capsys, *args)
    assert_one_line_error(result, pattern)
    assert result.stdout == ""


@pytest.mark.parametrize("args", [
    ["run", "--bogus"],  # the parser's own
    ["run", "-n", "0"],  # a flag's range, the parser's
    ["run", "--temp", "-1"],  # a flag's range, moe-local's
    ["chat", "--dtype", "int4"],
    ["run", "--gpu-memory", "12"],
    ["run", "-p", "hi", "-f", "x.txt"],
    ["plan", "some/model", "--preset", "tiny"],
])
def test_every_usage_error_exits_2(monkeypatch, capsys, args):
    assert cli_in_process(monkeypatch, capsys, *args).returncode == 2


def test_a_failure_of_what_the_command_line_names_exits_1(monkeypatch, capsys, tmp_path):
    assert cli_in_process(monkeypatch, capsys, "info", str(tmp_path / "nope")).returncode == 1


@pytest.mark.parametrize("command, option", [("run", "--gpu-memory"), ("chat", "--system"), ("info", "--json")])
def test_help_still_works(monkeypatch, capsys, command, option):
    result = cli_in_process(monkeypatch, capsys, command, "--help")
    assert result.returncode == 0 and option in result.stdout and result.stderr == ""


def with_chat_template(tiny, folder: Path, template: str) -> Path:
    shutil.copytree(tiny[0], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def test_a_chat_template_that_raises_is_one_line(tiny, tmp_path):
    folder = with_chat_template(tiny, tmp_path / "m", "{{ raise_exception('this model takes no chat') }}")
    message = "chat template failed: this model takes no chat"
    assert_one_line_error(moe_local_cli("run", str(folder), "-p", "hi", "--device", "cpu", "-q"), message)
    # chat fails at start, before the first message
    assert_one_line_error(moe_local_cli("chat", str(folder), "--device", "cpu", "-q", input=""), message)


def test_a_chat_template_with_a_syntax_error_is_one_line(tiny, tmp_path):
    folder = with_chat_template(tiny, tmp_path / "m", "{% for m in messages %}{{ m['content'] }}")
    result = moe_local_cli("chat", str(folder), "--device", "cpu", "-q", input="")
    assert_one_line_error(result, "chat template failed: syntax error on line 1")

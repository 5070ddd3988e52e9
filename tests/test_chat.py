"""`moe-local chat`: the conversation (`ChatSession`) on its own, then real sessions driven in tmux."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

import moe_local
from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer
from conftest import build_mixtral, moe_local_cli
from moe_local.chat import ChatSession, answer
from moe_local.errors import MoeLocalError
from moe_local.generate import SamplingParams

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "moe_local" / "demo"
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="session")
def endless(tiny, tmp_path_factory) -> Path:
    """The tiny model with no end-of-text token, so that only max-new-tokens, the context or Ctrl-C ends an
    answer (a random model emits EOS whenever it likes)."""
    folder = tmp_path_factory.mktemp("endless")
    shutil.copytree(tiny[0], folder, dirs_exist_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))
    return folder


def session(folder, max_new_tokens: int | None = 6, **options) -> ChatSession:
    return ChatSession(moe_local.load(folder, device="cpu", **options), GREEDY, max_new_tokens)


def turn(chat: ChatSession, text: str, stop_after: int | None = None) -> list[int]:
    chat.ask(text)
    tokens = []
    for token in chat.reply(stopped=lambda: stop_after is not None and len(tokens) >= stop_after):
        tokens.append(token)
    return tokens


def test_the_second_turn_evaluates_only_the_tokens_the_kv_cache_lacks(tiny):
    chat = session(tiny[0])
    first = turn(chat, "def f(x):")
    assert chat.stats.finish_reason == "length"  # this model does not end its answer early
    first_prompt, held = chat.prompt, list(chat.engine.tokens)
    # the cache holds the first prompt and the answer (all but its last token, sampled and never fed)
    assert held == first_prompt + first[:-1]
    chat.ask("import os")
    tokenizer = chat.engine.tokenizer
    after_answer = tokenizer.render_chat_text(chat.messages).split(tokenizer.decode(first), 1)[1]
    assert after_answer == "</s>[INST] import os [/INST]"
    # the answer stays as it was generated, whatever the rendered text would tokenize to
    assert chat.prompt == held + first[-1:] + tokenizer.encode(after_answer, bos=False)
    second = list(chat.reply())
    assert chat.stats.prompt_tokens_evaluated == len(chat.prompt) - len(held)
    assert [m["content"] for m in chat.messages] == ["def f(x):", tokenizer.decode(first), "import os", tokenizer.decode(second)]
    # the reused cache gives what a fresh engine computes from the whole prompt
    fresh = moe_local.load(tiny[0], device="cpu")
    assert list(fresh.generate(chat.prompt, 6, GREEDY)) == second


def test_stopping_keeps_the_partial_answer_and_the_conversation_goes_on(tiny):
    chat = session(tiny[0], max_new_tokens=None)
    partial = turn(chat, "def f(x):", stop_after=3)
    assert len(partial) == 3 and chat.stats.finish_reason == "interrupted"
    assert chat.messages[-1] == {"role": "assistant", "content": chat.engine.tokenizer.decode(partial)}
    assert chat.stats.experts["in_place"] > 0  # --device cpu: the experts ran where they lie
    held = list(chat.engine.tokens)
    turn(chat, "go on", stop_after=2)
    assert chat.stats.prompt_tokens_evaluated == len(chat.prompt) - len(held)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_a_long_conversation_drops_the_oldest_turns_instead_of_failing(endless):
    chat = session(endless, max_new_tokens=8, ctx_size=96)
    dropped = 0
    for i in range(8):
        dropped += chat.ask(f"question {i}: def f(x):")
        assert len(chat.prompt) + 8 <= 96  # room for the whole answer
        assert len(list(chat.reply())) == 8
        assert chat.messages[0]["role"] == "user" and len(chat.messages) % 2 == 0
    assert dropped > 0 and chat.messages[-2]["content"] == "question 7: def f(x):"
    assert len(chat.messages) < 16
    before = list(chat.messages)
    with pytest.raises(MoeLocalError, match=r"this message takes \d+ tokens .* the context holds 96"):
        chat.ask("word " * 200)
    assert chat.messages == before


def test_an_answer_that_fills_the_context_makes_room_next_turn(endless):
    chat = session(endless, max_new_tokens=None, ctx_size=64)
    answer = turn(chat, "def f(x):")
    assert chat.context_full and len(chat.prompt) + len(answer) == 65
    assert chat.ask("more") == 1 and len(chat.messages) == 1


def test_set_changes_the_sampling_settings_and_refuses_bad_values(tiny):
    chat = ChatSession(moe_local.load(tiny[0], device="cpu"), SamplingParams(temperature=0.7))
    assert chat.command("/set temperature 0.3") == "Set temperature to 0.3."
    assert chat.params.temperature == 0.3
    chat.command("/set temp 0")
    chat.command("/set top-k 5")
    chat.command("/set top_p 0.5")
    chat.command("/set min_p 0.1")
    chat.command("/set repeat_penalty 1.1")
    chat.command("/set seed 7")
    chat.command("/set max_new_tokens 12")
    assert chat.params == replace(SamplingParams(), temperature=0, top_k=5, top_p=0.5, min_p=0.1, repeat_penalty=1.1, seed=7)
    assert chat.max_new_tokens == 12
    refused = {
        "/set temperature abc": "temperature takes a number, not 'abc'",
        "/set temperature -1": "temperature must be >= 0",
        "/set top_p 2": r"top-p must be in \(0, 1\]",
        "/set top_k 1.5": "top_k takes a whole number",
        "/set max_new_tokens 0": "max_new_tokens must be >= 1",
        "/set temperature": "temperature takes a number, not ''",
        "/set bogus 1": "/set needs one of temperature, .* system, think, preserve-thinking, reasoning or verbose",
        "/set reasoning low": r"this model's chat template has no reasoning effort \(reasoning_effort\)",
        "/set": "/set needs one of",
        "/nope": r"unknown command /nope \(/\? for help\)",
    }
    for line, message in refused.items():
        with pytest.raises(MoeLocalError, match=message):
            chat.command(line)
    assert chat.params.temperature == 0 and chat.params.top_p == 0.5 and chat.max_new_tokens == 12


def test_other_commands(endless):
    chat = session(endless, max_new_tokens=4)
    assert "/set" in chat.command("/?") and chat.command("/help") == chat.command("/?")
    assert chat.command("/stats").endswith("no answer yet")
    turn(chat, "def f(x):")
    chat.command("/set system You write Python.")
    turn(chat, "hi")
    system = {"role": "system", "content": "You write Python."}
    assert chat.prompt == chat.engine.tokenizer.render_chat([system, *chat.messages[:3]])  # rendered anew
    stats = chat.command("/stats")
    assert "2 turns;" in stats and f"{len(chat.prompt)} tokens" in stats and "ended by" in stats
    assert chat.command("/clear") == "Cleared the conversation." and chat.messages == []
    assert "0 turns" in chat.command("/stats")
    assert chat.command("/set system") == "Removed the system message." and chat.system is None
    assert chat.command("/bye") is None


def test_a_system_message_the_template_rejects_is_refused(tiny, tmp_path):
    shutil.copytree(tiny[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages here') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = ChatSession(moe_local.load(tmp_path, device="cpu"), GREEDY)
    with pytest.raises(MoeLocalError, match="chat template failed: no system messages here"):
        chat.command("/set system Be brief.")
    assert chat.system is None


# --- Qwen3's template: the think switch, a list of EOS ids -----------------------------------------------


@pytest.fixture(scope="session")
def qwen3_chat(tmp_path_factory) -> Path:
    """The tiny model with Qwen3's byte-level tokenizer and chat template, and generation_config.json's list of
    EOS ids (<|im_end|>, <|endoftext|>)."""
    folder = tmp_path_factory.mktemp("qwen3-chat")
    build_mixtral(folder, None, vocab_size=512, seed=7)
    train_bytelevel_tokenizer(folder, **FAMILY_TOKENIZERS["qwen3_moe"])
    return folder


def test_the_think_switch_reaches_qwen3s_template_as_enable_thinking(qwen3_chat):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(qwen3_chat)
    chat = ChatSession(moe_local.load(qwen3_chat, device="cpu"), GREEDY, 4, system="Be brief.", think=False)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    system = [{"role": "system", "content": "Be brief."}]

    def expected(**options) -> list[int]:
        return reference.apply_chat_template(system + messages, add_generation_prompt=True, return_dict=False, **options)

    assert chat.render(messages)[1] == expected(enable_thinking=False)
    assert chat.render(messages)[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat.command("/set think on") == "Set think on." and chat.think is True
    assert chat.render(messages)[1] == expected(enable_thinking=True)
    chat.think = None  # the CLI's default: the template decides
    assert chat.render(messages)[1] == expected()


def test_run_passes_no_think_to_the_template(qwen3_chat, tiny):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(qwen3_chat)
    result = moe_local_cli("run", str(qwen3_chat), "-p", "Why?", "--no-think", "-n", "2", "--json", "-q", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    messages = [{"role": "user", "content": "Why?"}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, return_dict=False)
    assert json.loads(result.stdout)["prompt_tokens"] == expected
    refused = {  # flags that exclude each other are a usage error (2); a model without the switch, a failure (1)
        (str(qwen3_chat), "--raw"): (2, "error: --think/--no-think set the chat template's enable_thinking, and --raw leaves the template out"),
        (str(tiny[0]),): (1, "error: this model's chat template has no thinking switch (enable_thinking), so --think/--no-think and /set think do not apply"),
    }
    for args, (status, message) in refused.items():
        result = moe_local_cli("run", *args, "-p", "Why?", "--think", "-n", "2", "-q", "--device", "cpu")
        assert (result.returncode, result.stderr) == (status, message + "\n")


@pytest.fixture(scope="session")
def qwen36_chat(tmp_path_factory) -> Path:
    """The tiny model with Qwen3.5/3.6's byte-level tokenizer and Qwen3.6's chat template (preserve_thinking)."""
    folder = tmp_path_factory.mktemp("qwen36-chat")
    build_mixtral(folder, None, vocab_size=512, seed=7)
    train_bytelevel_tokenizer(folder, **FAMILY_TOKENIZERS["qwen3_5_moe"])
    return folder


def test_preserve_thinking_reaches_qwen36s_template_and_keeps_an_earlier_answers_reasoning(qwen36_chat, tiny):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(qwen36_chat)
    chat = ChatSession(moe_local.load(qwen36_chat, device="cpu"), GREEDY, 4, preserve_thinking=True)
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"},
                {"role": "user", "content": "And 3 + 3?"}]

    def expected(**options) -> list[int]:
        return reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **options)

    assert chat.render(messages)[1] == expected(preserve_thinking=True)
    assert "<|im_start|>assistant\n<think>\nEasy: four.\n</think>\n\n4<|im_end|>" in chat.render(messages)[0]
    assert chat.command("/set preserve-thinking off") == "Set preserve-thinking off." and chat.preserve_thinking is False
    assert chat.render(messages)[1] == expected(preserve_thinking=False) == expected()  # the template's default: dropped
    assert "Easy: four." not in chat.render(messages)[0]
    with pytest.raises(MoeLocalError, match=r"no preserve_thinking switch \(Qwen3\.6's\)"):
        ChatSession(moe_local.load(tiny[0], device="cpu"), GREEDY, preserve_thinking=True)
    result = moe_local_cli("chat", str(tiny[0]), "--preserve-thinking", "-q", "--device", "cpu", input="")
    assert (result.returncode, result.stderr) == (1, "error: this model's chat template has no preserve_thinking switch (Qwen3.6's), "
                                                     "so --preserve-thinking and /set preserve-thinking do not apply\n")


def test_the_think_switch_is_refused_where_the_template_has_none(tiny):
    chat = session(tiny[0])
    with pytest.raises(MoeLocalError, match="no thinking switch"):
        ChatSession(chat.engine, GREEDY, think=False)
    with pytest.raises(MoeLocalError, match="no thinking switch"):
        chat.command("/set think on")
    with pytest.raises(MoeLocalError, match="/set think takes on or off, not 'maybe'"):
        chat.command("/set think maybe")
    assert chat.think is None


def test_any_eos_id_of_generation_config_ends_an_answer_and_the_next_turn_reuses_the_cache(qwen3_chat, tmp_path):
    shutil.copytree(qwen3_chat, tmp_path, dirs_exist_ok=True)
    chat = ChatSession(moe_local.load(tmp_path, device="cpu"), GREEDY, 6)
    free = turn(chat, "def f(x):")
    assert len(free) == 6 and free[2] not in free[:2]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2  # Qwen3's <|im_end|> and <|endoftext|>
    generation["eos_token_id"].append(free[2])  # one more: the third token the model writes
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))

    chat = ChatSession(moe_local.load(tmp_path, device="cpu"), GREEDY, 6)
    assert turn(chat, "def f(x):") == free[:2] and chat.stats.finish_reason == "stop"
    held = list(chat.engine.tokens)
    turn(chat, "more")
    # ChatML closes the answer with <|im_end|>, an added token: the answer's ids stay as generated
    assert held[-2:] == free[:2] and chat.prompt[: len(held)] == held
    assert chat.stats.prompt_tokens_evaluated == len(chat.prompt) - len(held)


# --- speed, saving and loading, the model's description --------------------------------------------------


def test_verbose_shows_each_answers_speed(endless, capsys):
    chat = session(endless, max_new_tokens=4)
    assert chat.verbose is False and chat.command("/set verbose on") == "Set verbose on."
    capsys.readouterr()
    answer(chat, "def f(x):")
    shown = capsys.readouterr().err
    assert re.search(r"^prompt eval   \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\), 0 more from the KV cache$", shown, re.M), shown
    assert re.search(r"^generation    4 tokens in [\d.]+ s \([\d.]+ tokens/s\)$", shown, re.M), shown
    chat.command("/set verbose off")
    answer(chat, "more")
    assert "generation" not in capsys.readouterr().err


def test_save_and_load_a_conversation_by_name_or_path(endless, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LOCAL_CACHE", str(tmp_path / "cache"))
    chats = tmp_path / "cache" / "chats"
    chat = session(endless, max_new_tokens=4)
    assert str(chats) in chat.command("/?")
    chat.command("/set system Be brief.")
    turn(chat, "def f(x):")
    turn(chat, "café ✓")
    assert chat.command("/save work") == f"Saved 2 turns to {chats / 'work.json'}."
    saved = json.loads((chats / "work.json").read_text(encoding="utf-8"))
    assert saved["messages"] == chat.messages and saved["system"] == "Be brief."
    assert chat.command(f"/save {tmp_path}/other.json") == f"Saved 2 turns to {tmp_path / 'other.json'}."
    # a path's folder must exist: a typo in it does not become new folders
    with pytest.raises(MoeLocalError, match=rf"^cannot save to {tmp_path}/typo/x\.json: the folder {tmp_path}/typo does not exist \(create it"):
        chat.command(f"/save {tmp_path}/typo/x.json")
    assert not (tmp_path / "typo").exists()

    later = ChatSession(chat.engine, GREEDY, 4)
    assert later.command("/load work") == f"Loaded 2 turns from {chats / 'work.json'}."
    assert later.messages == chat.messages and later.system == "Be brief."
    later.ask("go on")
    system = {"role": "system", "content": "Be brief."}
    assert later.prompt == later.engine.tokenizer.render_chat([system, *chat.messages, {"role": "user", "content": "go on"}])
    assert later.command(f"/load {tmp_path}/other.json").startswith("Loaded 2 turns")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no saved conversation at"),
        ("{not json", "cannot read"),
        ("[1, 2]", "is not a saved conversation"),
        ('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]}', "alternate user/assistant"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "is not a saved conversation"),
        ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}', "each with a text content"),
        ('{"messages": [], "system": 3}', "is not a saved conversation"),
    ],
)
def test_load_refuses_what_is_not_a_saved_conversation(endless, tmp_path, content, message):
    path = tmp_path / "chat.json"
    if content is not None:
        path.write_text(content)
    chat = session(endless, max_new_tokens=2)
    turn(chat, "hi")
    before = list(chat.messages)
    with pytest.raises(MoeLocalError, match=message):
        chat.command(f"/load {path}")
    assert chat.messages == before


def test_save_and_load_errors_are_one_line(endless, tmp_path):
    chat = session(endless, max_new_tokens=2)
    (tmp_path / "file").write_text("")
    with pytest.raises(MoeLocalError, match=f"cannot save to {tmp_path}/file/x.json: "):
        chat.command(f"/save {tmp_path}/file/x.json")
    for line in ("/save", "/load "):
        with pytest.raises(MoeLocalError, match="give a NAME or a file path"):
            chat.command(line)


def test_show_info_describes_the_model_as_info_does(tiny):
    chat = session(tiny[0])
    shown = chat.command("/show info")
    cfg = chat.engine.cfg
    assert f"model         {tiny[0]}" in shown
    assert "architecture  MixtralForCausalLM (mixtral)" in shown
    assert "active per token (2 of 8 experts in each of 3 MoE layers; " in shown and " without the token embedding table)" in shown
    assert f"context       {chat.engine.ctx_size} tokens (--ctx-size; the model's: {cfg.max_position_embeddings})" in shown
    assert f"experts       {chat.engine.store.format.key}, " in shown
    with pytest.raises(MoeLocalError, match="/show takes info"):
        chat.command("/show")


# --- real sessions in a terminal ------------------------------------------------------------------------


class Terminal:
    """A 120x40 tmux pane on a private tmux server, running `command` in the repository root."""

    def __init__(self, command: str):
        self.server = f"moe-local-test-{uuid.uuid4().hex[:8]}"
        # the shell line stays on screen after the command, with its exit status
        self.tmux("new-session", "-d", "-x", "120", "-y", "40", "-c", str(ROOT), f"{command}; echo exit status $?; sleep 600")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.server, *args], check=True, capture_output=True, text=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-")  # with the scrollback, wrapped lines joined

    def wait_for(self, ready, what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if ready(screen):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"waited {timeout} s for {what}; the screen:\n{screen}")
            time.sleep(0.05)

    def wait_for_text(self, pattern: str) -> str:
        return self.wait_for(lambda screen: re.search(pattern, screen, re.M), repr(pattern))

    def wait_for_prompt(self, count: int) -> str:
        """Until the pane ends with an empty `>>> ` prompt, the count-th (or a later one)."""
        return self.wait_for(
            lambda screen: len(re.findall("^>>> ", screen, re.M)) >= count and screen.rstrip().splitlines()[-1:] == [">>>"],
            f"prompt {count}",
        )

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def type(self, line: str) -> None:
        self.tmux("send-keys", "-l", line)
        self.tmux("send-keys", "Enter")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True)


@pytest.fixture
def terminal():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    opened = []

    def open_terminal(command: str) -> Terminal:
        opened.append(Terminal(command))
        return opened[-1]

    yield open_terminal
    for t in opened:
        t.close()


def moe_local_command(*args: str) -> str:
    return " ".join([sys.executable, "-m", "moe_local", *args])


def test_chat_in_a_terminal(endless, terminal):
    t = terminal(moe_local_command("chat", str(endless), "--device", "cpu", "--temp", "0", "--ctx-size", "20000", "-q"))
    t.wait_for_prompt(1)
    t.type("/set max_new_tokens 5")
    t.wait_for_text(r"^Set max_new_tokens to 5\.$")
    t.type("/set temperature -1")
    t.wait_for_text(r"^error: temperature must be >= 0$")
    t.type("def f(x):")
    t.wait_for_prompt(4)
    t.type("/stats")
    t.wait_for_text(r"^conversation  1 turn;")
    t.wait_for_text(r"^last answer   5 tokens .* ended by max_new_tokens$")

    # Ctrl-C stops an endless answer and keeps it: wait until it has started, then interrupt
    t.type("/set max_new_tokens 100000")
    t.type("/set temperature 0.5")
    t.wait_for_text(r"^Set temperature to 0\.5\.$")
    t.type("tell me more")
    t.wait_for(lambda screen: screen.split(">>> tell me more\n")[-1].strip(), "the answer to start")
    t.send("C-c")
    t.wait_for_prompt(8)
    t.type("/stats")
    t.wait_for_text(r"^conversation  2 turns;")
    t.wait_for_text(r"^last answer .* ended by Ctrl-C$")

    t.type("/clear")
    t.wait_for_text(r"^Cleared the conversation\.$")
    t.send("C-c")  # at the prompt: a hint, not an exit
    t.wait_for_text(r"^Use Ctrl \+ d or /bye to exit\.$")
    t.type("/stats")
    t.wait_for_text(r"^conversation  0 turns;")
    t.type("/bye")
    t.wait_for_text(r"^exit status 0$")


def test_chat_with_the_demo_model_reads_multiline_messages_and_exits_on_ctrl_d(terminal, tmp_path):
    message = 'def f(x):\n    """Twice x."""'
    engine = moe_local.load(DEMO, device="cpu")
    expected = ChatSession(engine, replace(engine.sampling_defaults(), temperature=0), max_new_tokens=12)
    expected.ask(message)
    answer = engine.tokenizer.decode(list(expected.reply()))
    first_line = next(line.rstrip() for line in answer.splitlines() if line.strip())

    t = terminal(moe_local_command("chat", "--device", "cpu", "--temp", "0", "-n", "12"))
    t.wait_for_text("using the built-in demo model")
    t.wait_for_prompt(1)
    t.type('"""def f(x):')
    t.type('    """Twice x."""' + '"""')
    screen = t.wait_for_prompt(2)
    shown = screen.split('... ' + '    """Twice x."""' + '"""\n')[1]
    assert first_line in [line.rstrip() for line in shown.splitlines()]
    t.send("Up")  # the whole message comes back, not its last line
    t.send("Enter")
    t.wait_for_prompt(3)
    t.type(f"/save {tmp_path / 'talk.json'}")
    t.wait_for_text(r"^Saved 2 turns to ")
    saved = json.loads((tmp_path / "talk.json").read_text())["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == [message, message]
    t.send("C-d")
    t.wait_for_text(r"^exit status 0$")


def test_chat_in_a_terminal_shows_speed_saves_loads_and_describes_the_model(endless, terminal, tmp_path):
    saved = tmp_path / "talk.json"
    t = terminal(moe_local_command("chat", str(endless), "--device", "cpu", "--temp", "0", "-n", "5", "--verbose", "-q"))
    t.wait_for_prompt(1)
    t.type("def f(x):")
    t.wait_for_text(r"^generation    5 tokens in [\d.]+ s \([\d.]+ tokens/s\)$")
    t.wait_for_prompt(2)
    t.type(f"/save {saved}")
    t.wait_for_text(rf"^Saved 1 turn to {re.escape(str(saved))}\.$")
    t.type("/clear")
    t.type(f"/load {saved}")
    t.wait_for_text(rf"^Loaded 1 turn from {re.escape(str(saved))}\.$")
    t.type("/stats")
    t.wait_for_text(r"^conversation  1 turn;")
    t.type("/show info")
    t.wait_for_text(r"^architecture  MixtralForCausalLM \(mixtral\)$")
    t.type("/set think on")
    t.wait_for_text(r"^error: this model's chat template has no thinking switch")
    t.type("/bye")
    t.wait_for_text(r"^exit status 0$")

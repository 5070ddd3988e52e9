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
from moe_local.chat import ChatSession
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
    assert chat.stats.experts["hits"] + chat.stats.experts["misses"] > 0
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
        "/set bogus 1": "/set needs one of temperature, .* or system",
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


def test_chat_with_the_demo_model_reads_multiline_messages_and_exits_on_ctrl_d(terminal):
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
    t.send("C-d")
    t.wait_for_text(r"^exit status 0$")

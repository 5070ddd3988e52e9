"""Input that is not valid UTF-8 becomes U+FFFD in `run`, `chat` and the Python API, instead of ending the chat
or failing inside sentencepiece ("Unable to cast Python instance of type <class 'str'> to C++ type")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import moe_local
from moe_local.chat import ChatSession
from moe_local.generate import SamplingParams

DEMO = Path(moe_local.__file__).parent / "demo"


def moe_local_bytes(*args: str | bytes, input: bytes | None = None) -> subprocess.CompletedProcess:
    """The command line as a user runs it, with bytes in argv or on stdin (conftest's moe_local_cli takes text)."""
    return subprocess.run([sys.executable, "-m", "moe_local", *args], input=input, capture_output=True, timeout=300)


def test_run_reads_a_piped_prompt_that_is_not_utf8():
    result = moe_local_bytes("run", "-n", "5", "--raw", "--device", "cpu", "-q", "--temp", "0", "--json", input=b"import \xff os")
    assert result.returncode == 0, result.stderr.decode()
    expected = moe_local_bytes("run", "-n", "5", "--raw", "--device", "cpu", "-q", "--temp", "0", "--json", input="import \ufffd os".encode())
    assert json.loads(result.stdout)["prompt_tokens"] == json.loads(expected.stdout)["prompt_tokens"]


def test_run_takes_a_prompt_argument_that_is_not_utf8():
    result = moe_local_bytes("run", "-n", "5", "--raw", "--device", "cpu", "-q", "-p", b"import \xff os")
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    chat = moe_local_bytes("run", "-n", "5", "--device", "cpu", "-q", "-p", b"caf\xe9 \xc3")  # latin-1, then a cut-off character
    assert chat.returncode == 0 and chat.stderr == b"", chat.stderr.decode()


def test_chat_goes_on_after_a_message_that_is_not_utf8():
    result = moe_local_bytes("chat", "--device", "cpu", "-q", "-n", "3", input=b"hi \xff\n/stats\n/bye\n")
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "error" not in stderr, stderr
    assert "conversation  1 turn;" in result.stdout.decode()


def test_the_api_encodes_lone_surrogates_as_the_replacement_character():
    engine = moe_local.load(DEMO, device="cpu")
    tokenizer = engine.tokenizer
    assert tokenizer.encode("import \udcff os") == tokenizer.encode("import \ufffd os")
    chat = ChatSession(engine, SamplingParams(temperature=0), max_new_tokens=2)
    chat.ask("hi \udcff")
    assert len(list(chat.reply())) == 2
    assert chat.messages[0] == {"role": "user", "content": "hi \ufffd"}  # kept as it can be saved
    assert ChatSession(engine, SamplingParams(), system="caf\udce9").system == "caf\ufffd"
    chat.command("/set system \udcff")
    assert chat.system == "\ufffd"

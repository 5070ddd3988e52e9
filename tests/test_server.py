"""`moe-local serve`, started as a user would (a subprocess on a free loopback port, the demo model in fp32)
and spoken to with the official `openai` client and with httpx: answers equal the library's single-request
answers, streamed or not, alone or 16 at once; bad input gets OpenAI's error object; a client that leaves
frees its place; the API key is required; SIGTERM stops the server cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch

import moe_local
from moe_local.generate import SamplingParams

DEMO = Path(moe_local.__file__).parent / "demo"
KEY = "test-key-0123"
CTX = 512
START_TIMEOUT_S = 120
GREEDY = SamplingParams(temperature=0)
# One torch thread, in the servers and in the reference: the answers are compared bit for bit, and on a
# busy machine two threads' tiny kernels mostly wait for each other.
THREADS = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`moe-local serve ARGS` on a free loopback port; ready when made, or with wait=False when `ready()` returns."""

    def __init__(self, *args: str, ctx: int = CTX, env: dict | None = None, threads: int = THREADS, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "moe_local", "serve", "--port", str(self.port), "--dtype", "fp32", "--ctx-size", str(ctx), "--threads", str(threads), *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, **(env or {})})
        if wait:
            self.ready()

    def ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)  # polling with a deadline, not a wait for an event
        self.stop()
        raise AssertionError(f"the server did not start: {self.process.stderr.read()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_health(self, ok, what: str) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = self.health()
            if ok(health):
                return health
            time.sleep(0.05)
        raise AssertionError(f"the server never reported {what}: {self.health()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = RunningServer("--parallel", "4", "--queue", "12", env={"MOE_LOCAL_API_KEY": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine():
    """The single-request reference: the library on the same model and options."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield moe_local.load(DEMO, device="cpu", dtype="fp32", ctx_size=CTX)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=120, **kwargs)


def alone(engine, ids: list[int], n: int, params: SamplingParams = GREEDY) -> str:
    engine.tokens = []
    return engine.tokenizer.decode(list(engine.generate(ids, n, params)))


def chat_ids(engine, messages: list[dict]) -> list[int]:
    return engine.tokenizer.render_chat(messages)


MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def parse(text):"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["demo"]
    health = httpx.get(f"{server.url}/health", timeout=10).json()  # no key needed
    assert health["status"] == "ok" and health["model"] == "demo"


def test_chat_completion_is_the_single_request_answer_with_usage(client, engine):
    answer = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=16, temperature=0)
    ids = chat_ids(engine, MESSAGES)
    assert answer.choices[0].message.content == alone(engine, ids, 16)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (len(ids), 16, len(ids) + 16)


def test_streamed_chat_gives_the_same_text_then_the_usage(client, engine):
    chunks = list(client.chat.completions.create(model="demo", messages=MESSAGES, max_completion_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone(engine, chat_ids(engine, MESSAGES), 12)
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finished] == ["length"]
    # the usage comes once, in a last chunk without choices, as OpenAI sends it: a client that sums counts it once
    assert [c for c in chunks if c.usage] == [chunks[-1]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_streamed_completion_with_include_usage_sends_the_usage_once(server):
    body = {"prompt": "def f(", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    with_usage = [e for e in events if e.get("usage")]
    assert len(with_usage) == 1 and with_usage[0] is events[-1] and events[-1]["choices"] == []
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 5


def test_completions_streamed_and_not(client, engine):
    prompt = "import os\n\ndef walk("
    want = alone(engine, engine.tokenizer.encode(prompt), 10)
    answer = client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0)
    assert answer.choices[0].text == want and answer.usage.completion_tokens == 10
    streamed = list(client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage.prompt_tokens == len(engine.tokenizer.encode(prompt))


def test_a_stop_string_ends_the_answer_before_it(client, engine):
    prompt = "class Config:\n    def __init__(self"
    full = alone(engine, engine.tokenizer.encode(prompt), 24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    answer = client.completions.create(model="demo", prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "never there"])
    assert answer.choices[0].text == full[: full.find(stop)] and answer.choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer_and_penalties_are_taken(client):
    ask = dict(model="demo", prompt="def main(", max_tokens=12, temperature=0.9, seed=5)
    first, again = (client.completions.create(**ask).choices[0].text for _ in range(2))
    assert first == again
    penalized = client.completions.create(**ask, presence_penalty=1.5, frequency_penalty=0.5)
    assert penalized.usage.completion_tokens == 12


def test_a_chat_resent_with_one_more_turn_evaluates_only_the_new_tokens(client, engine):
    first = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8, temperature=0)
    turn = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "and tests?"}]
    second = client.chat.completions.create(model="demo", messages=turn, max_tokens=8, temperature=0)
    # at least the first prompt is reused (the answer, tokenized anew, may split differently from how it was generated)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert second.choices[0].message.content == alone(engine, chat_ids(engine, turn), 8)


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"messages": "hi"}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role must be one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": ["hm"]},
                   {"role": "user", "content": "so?"}]}, 400, "messages[1].reasoning_content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "'max_tokens' must be at least 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "'max_tokens' must be at least 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400, "'max_tokens' must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "'top_p' must be in (0, 1], not 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, 400, "between -2 and 2"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "'stop' must be a string or a list of strings"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n' must be 1"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "the context holds 512"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "roles must alternate"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_gets_a_4xx_with_openais_error_object(server, body, status, message):
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}


PARAMS = [
    ("/v1/chat/completions", {"top_p": 1.5}, "top_p", "'top_p' must be in (0, 1], not 1.5"),
    ("/v1/chat/completions", {"temperature": -1}, "temperature", "'temperature' must be >= 0, not -1"),
    ("/v1/completions", {"top_k": -2}, "top_k", "'top_k' must be >= 0, not -2"),
    ("/v1/completions", {"min_p": 2}, "min_p", "'min_p' must be in [0, 1], not 2"),
    ("/v1/completions", {"repeat_penalty": 0}, "repeat_penalty", "'repeat_penalty' must be > 0, not 0"),
    ("/v1/completions", {"seed": -1}, "seed", "'seed' must be a whole number from 0 to"),
    ("/v1/completions", {"prompt": "word " * 2000}, "prompt", "the context holds 512"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 2000}]}, "messages", "the context holds 512"),
    ("/v1/completions", {"prompt": ""}, "prompt", "'prompt' is empty"),
    ("/v1/completions", {"prompt": [" \n "]}, "prompt", "'prompt' is empty"),
]


@pytest.mark.parametrize("path, fields, param, message", PARAMS, ids=[f"{p}-{param}-{m[:20]}" for p, _, param, m in PARAMS])
def test_an_errors_param_and_message_name_the_apis_field(server, path, fields, param, message):
    body = {"messages": [{"role": "user", "content": "hi"}]} if path.endswith("chat/completions") else {"prompt": "x"}
    error = post(server, path, {**body, "max_tokens": 2, **fields}).json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_other_faults_get_the_error_object_too_and_the_server_goes_on(server, client):
    long_prompt = post(server, "/v1/completions", {"prompt": "word " * 2000})
    assert long_prompt.status_code == 400 and long_prompt.json()["error"]["code"] == "context_length_exceeded"
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 0}).status_code == 400
    assert post(server, "/v1/completions", {"prompt": {"a": 1}}).status_code == 400
    too_large = post(server, "/v1/completions", b'{"prompt": "' + b"a" * (5 * 2**20) + b'"}')
    assert too_large.status_code == 413 and "larger than" in too_large.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    assert client.completions.create(model="demo", prompt="x = ", max_tokens=3).usage.completion_tokens == 3


def test_the_api_key_is_required(server):
    body = {"prompt": "x", "max_tokens": 1}
    for key in (None, "wrong-key"):
        response = post(server, "/v1/completions", body, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0).models.list()
    assert post(server, "/v1/completions", body).status_code == 200
    # the scheme is case-insensitive (RFC 9110); the key is not, and another scheme is not a bearer token
    for header, status in ((f"bearer {KEY}", 200), (f"BEARER {KEY}", 200), (f"Bearer {KEY.upper()}", 401), (f"Basic {KEY}", 401), (KEY, 401)):
        response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": header}, timeout=10)
        assert response.status_code == status, header


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    before = server.health()["cancelled"]
    body = {"prompt": "def long_function(", "max_tokens": 100000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data:")
    # leaving the block closes the connection
    server.wait_health(lambda h: h["cancelled"] == before + 1 and h["running"] == 0, "the request cancelled")


def test_sixteen_concurrent_greedy_requests_each_get_their_single_request_answer(server, engine):
    prompts = [f"def f{i}(" + "x, " * (i % 5) for i in range(16)]
    lengths = [4 + (3 * i) % 20 for i in range(16)]
    want = [alone(engine, engine.tokenizer.encode(p), n) for p, n in zip(prompts, lengths)]

    def ask(i: int) -> tuple[str, dict]:
        answer = post(server, "/v1/completions", {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0}).json()
        return answer["choices"][0]["text"], answer["usage"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert [text for text, _ in got] == want
    assert [usage["completion_tokens"] for _, usage in got] == lengths


def test_the_http_side_is_a_process_of_its_own_without_torch(server):
    engine_side = psutil.Process(server.process.pid)
    http = [c for c in engine_side.children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(http) == 1
    assert any("libtorch" in m.path for m in engine_side.memory_maps())
    assert not any("libtorch" in m.path for m in http[0].memory_maps())


def test_a_port_in_use_is_one_line_before_the_model_loads(monkeypatch, capsys):
    from moe_local.engine import Engine
    from test_cli import assert_one_line_error, cli_in_process

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Engine, "from_folder", load)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = cli_in_process(monkeypatch, capsys, "serve", "--port", str(port), "--device", "cpu")
    assert_one_line_error(result, f"^error: cannot listen on 127.0.0.1:{port}: Address already in use$")


def test_a_quiet_server_on_port_0_still_says_where_it_listens():
    command = [sys.executable, "-m", "moe_local", "serve", "--port", "0", "-q", "--dtype", "fp32", "--ctx-size", "64", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()  # the first and only line a quiet server writes
        url = re.fullmatch(r"serving demo on (http://127\.0\.0\.1:\d+)/v1 \(--parallel 4, 16 more may wait\)\n", line)
        assert url, line
        assert not url.group(1).endswith(":0") and httpx.get(f"{url.group(1)}/health", timeout=30).json()["status"] == "ok"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and err == "", err


def test_the_http_process_goes_when_the_engines_process_dies():
    s = RunningServer("--parallel", "1")
    s.process.kill()  # SIGKILL: no handler runs, no shutdown is said
    s.process.communicate(timeout=60)  # the pipes close when both processes have gone: the HTTP one holds them too
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{s.url}/health", timeout=5)


@pytest.fixture(scope="module")
def small_server():
    """One place in the batch, none in the queue; a context long enough that a request asking for all of it
    is still generating when the test's next request arrives (the demo model writes no end of text)."""
    s = RunningServer("--parallel", "1", "--queue", "0", ctx=4096)
    yield s
    s.stop()


def test_past_the_queue_the_server_answers_503_with_retry_after(small_server):
    body = {"prompt": "def busy(", "max_tokens": 100000, "stream": True}
    with httpx.stream("POST", f"{small_server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(lines).startswith("data:")
        refused = post(small_server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
    small_server.wait_health(lambda h: h["running"] == 0 and h["waiting"] == 0, "the place free again")
    assert post(small_server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None).status_code == 200


def test_sigterm_stops_the_server_cleanly_also_mid_stream(small_server):
    body = {"prompt": "def busy(", "max_tokens": 100000, "stream": True}
    ended = threading.Event()

    def read_until_the_end():
        try:
            with httpx.stream("POST", f"{small_server.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if not ended.is_set():
                        ended.set()  # the first line: it is streaming
        except httpx.TransportError:
            pass
        ended.set()

    reader = threading.Thread(target=read_until_the_end)
    reader.start()
    assert ended.wait(60)
    small_server.process.send_signal(signal.SIGTERM)
    _, err = small_server.process.communicate(timeout=60)
    reader.join(60)
    assert small_server.process.returncode == 0, err
    assert "stopped (SIGTERM)" in err and "Traceback" not in err

"""`moe-local serve` for agents and apps, spoken to with the official `openai` and `anthropic` clients: tool calls in
Qwen3's, GLM-4.5's, gpt-oss's, Mistral's, Gemma 4's and DeepSeek-V3.1's own formats (forced by a grammar: request with tools -> tool_calls -> tool result -> answer, streamed
and not), structured output that validates, logprobs equal to the log-softmax of the engine's logits, logit_bias.
Tiny random checkpoints with each family's real tokenizer layout and chat template."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import openai
import pytest
import torch

import moe_local
from moe_local import anthropic_api
from moe_local.params import Output
from moe_local.replies import Thinking
from moe_local.tools import FORMATS
import chat_templates
from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer, train_gemma_tokenizer
from conftest import build_mixtral, moe_local_cli
from families import build_family
from test_server import RunningServer

transformers = pytest.importorskip("transformers")

KEY = "agents-key"
VOCAB = 512
CTX = 1024
FAMILIES = ["qwen3_moe", "glm4_moe", "gpt_oss", "mixtral", "gemma4", "deepseek_v31"]  # deepseek_v31: DeepSeek-V3 with V3.1's template
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Paris?"}]


# Mixtral with Mistral's template that takes tools (Mixtral-8x7B-Instruct's own takes none), a byte-level BPE standing
# in for its sentencepiece vocabulary, with Mistral's control tokens
MISTRAL = dict(chat_template=chat_templates.MISTRAL_SMALL_3_1, head_tokens=("<unk>", "<s>", "</s>"),
               special_tokens=("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
                               "[TOOL_CALLS]", "[IMG]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
               bos_token="<s>", eos_token="</s>", tokenizer_class="LlamaTokenizerFast", generation_eos=("</s>",))


def model_folder(tmp_path_factory, family: str):
    folder = tmp_path_factory.mktemp(family)
    if family == "mixtral":
        build_mixtral(folder, None, vocab_size=VOCAB)
    else:
        build_family("deepseek_v3" if family == "deepseek_v31" else family, folder, vocab_size=VOCAB)
    if family == "gemma4":
        train_gemma_tokenizer(folder, vocab_size=VOCAB)
    elif family == "deepseek_v31":
        train_bytelevel_tokenizer(folder, vocab_size=VOCAB, **{**FAMILY_TOKENIZERS["deepseek_v3"], "chat_template": chat_templates.DEEPSEEK_V31})
    else:
        train_bytelevel_tokenizer(folder, vocab_size=VOCAB, **(MISTRAL if family == "mixtral" else FAMILY_TOKENIZERS[family]))
    return folder


class Families:
    """Each family's checkpoint and server, one ahead: the next family's server loads while this one's tests run."""

    def __init__(self, tmp_path_factory):
        self.tmp, self.started = tmp_path_factory, {}

    def start(self, name: str):
        if name not in self.started:
            folder = model_folder(self.tmp, name)
            self.started[name] = folder, RunningServer(str(folder), "--parallel", "8", ctx=CTX, env={"MOE_LOCAL_API_KEY": KEY}, threads=1, wait=False)
        return self.started[name]

    def take(self, name: str):
        folder, server = self.start(name)
        for later in FAMILIES[FAMILIES.index(name) + 1 : FAMILIES.index(name) + 2]:
            self.start(later)
        server.ready()
        return folder, server

    def stop(self) -> None:
        for _, server in self.started.values():
            server.stop()


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    started = Families(tmp_path_factory)
    yield started
    started.stop()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, families):
    """(family, folder, server, client) for each family in turn."""
    folder, server = families.take(request.param)
    yield request.param, folder, server, openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    server.stop()


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


def streamed_calls(chunks, pieces: list | None = None) -> tuple[list[dict], str, str | None]:
    """The calls a stream's deltas add up to (as the openai client's users join them), its text and finish_reason;
    each call's deltas go into `pieces`. The first delta of a call has its id, type and name, the others only
    arguments."""
    calls: dict[int, dict] = {}
    text, reason = "", None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        reason = choice.finish_reason or reason
        for call in choice.delta.tool_calls or []:
            first = call.index not in calls
            assert (call.id is not None, call.type, call.function.name is not None) == ((True, "function", True) if first else (False, None, False))
            into = calls.setdefault(call.index, {"name": "", "arguments": ""})
            into["name"] += call.function.name or ""
            into["arguments"] += call.function.arguments or ""
            if pieces is not None:
                pieces.append(call.function.arguments)
    return [calls[i] for i in sorted(calls)], text, reason


def test_a_forced_call_round_trips_and_streams_the_same(family):
    name, folder, server, client = family
    ask = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
               parallel_tool_calls=False, max_tokens=80, temperature=0)
    answer = client.chat.completions.create(**ask)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and len(call.id) == 9
    jsonschema.validate(json.loads(call.function.arguments), schema_of(WEATHER))

    pieces = []
    calls, text, reason = streamed_calls(client.chat.completions.create(**ask, stream=True), pieces)
    assert calls == [{"name": "get_weather", "arguments": call.function.arguments}] and reason == "tool_calls" and text == ""
    assert len(pieces) > 3  # the arguments come as the model writes them

    # the call and its result go back; the prompt is the one transformers' apply_chat_template renders
    turn = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'}]
    then = client.chat.completions.create(model="m", messages=turn, tools=[WEATHER, TIME], max_tokens=4, temperature=0)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    as_template_reads = turn[:2] + [{"role": "assistant", "content": "", "tool_calls": [{"id": call.id, "type": "function", "function": {
        "name": "get_weather", "arguments": json.loads(call.function.arguments)}}]}, turn[3]]
    if name == "gemma4":  # the result in the calling turn, as Google's documentation passes it to the template
        as_template_reads = as_template_reads[:2] + [{**as_template_reads[2], "tool_responses": [{"name": "get_weather", "response": turn[3]["content"]}]}]
    if name == "deepseek_v31":  # the tools after the system prompt, as its model card writes them; the arguments as text
        tools = {"role": "system", "content": FORMATS["deepseek-v3.1"].system_tools([WEATHER, TIME])}
        as_template_reads = [ASK[0], tools, ASK[1], {**as_template_reads[2], "tool_calls": [call.model_dump()]}, turn[3]]
    want = reference.apply_chat_template(as_template_reads, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert then.usage.prompt_tokens == len(want)
    assert then.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # OpenAI's tools need no description (gpt-oss's template adds it to a string: it gets an empty one)
    bare = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
    assert client.chat.completions.create(model="m", messages=ASK, tools=[bare], max_tokens=1).usage.completion_tokens == 1


def test_tool_choice_required_may_call_several(family):
    name, folder, server, client = family
    if name == "gpt_oss":
        pytest.skip("harmony ends the answer at a call (<|call|>): one call per answer")
    if name == "mixtral":
        pytest.skip("Mistral's calls are one JSON list: cut by max_tokens, it is no call (several are read in test_tools)")
    if name == "deepseek_v31":
        pytest.skip("DeepSeek's calls are one block: cut by max_tokens, it is no call (several are read in test_tools)")
    tokens = reference_tokenizer(folder).convert_ids_to_tokens(list(range(VOCAB)))
    stops = {str(i): -100 for i, token in enumerate(tokens) if token in ("<|im_end|>", "<|endoftext|>", "<|user|>", "<|observation|>",
                                                                        "<eos>", "<turn|>", "<|tool_response>")}
    ask = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=100, temperature=0.7, seed=3,
               logit_bias=stops)  # no end of text: calls until the length
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "length" and len(choice.message.tool_calls) >= 2
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schema_of(WEATHER if call.function.name == "get_weather" else TIME))
    calls, text, _ = streamed_calls(client.chat.completions.create(**ask, stream=True))
    whole = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
    assert calls[: len(whole)] == whole and text == (choice.message.content or "")
    # a call that max_tokens cut off is the answer's text; a stream has begun it already (see tools.ToolParser)
    assert len(whole) <= len(calls) <= len(whole) + bool(text)


def test_a_malformed_call_comes_back_as_text(family):
    name, folder, server, client = family
    if name != "qwen3_moe":
        pytest.skip("once is enough")
    # the stop string cuts the forced call before its arguments: what is left is no call
    ask = dict(model="m", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0, stop=['"arguments"'])
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == '<tool_call>\n{"name": "get_weather", '
    calls, text, reason = streamed_calls(client.chat.completions.create(**ask, stream=True))
    assert (calls, text, reason) == ([], choice.message.content, "stop")


def reference_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def reference_token(folder, i: int) -> str:
    return reference_tokenizer(folder).convert_ids_to_tokens(i)


def test_a_json_schema_answer_always_validates(family):
    name, folder, server, client = family
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    answers = 50 if name == "qwen3_moe" else 8

    def ask(seed: int):
        return client.chat.completions.create(model="m", messages=ASK, max_tokens=60, temperature=1.0, seed=seed,
                                              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})

    with ThreadPoolExecutor(8) as pool:
        for answer in pool.map(ask, range(answers)):
            assert answer.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_eight_concurrent_requests_each_follow_their_own_grammar(family):
    name, folder, server, client = family
    if name != "qwen3_moe":
        pytest.skip("once is enough")
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer", "minimum": i, "maximum": i + 3}}, "required": [f"k{i}"],
                "additionalProperties": False} for i in range(6)] + [{"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
                                                                    {"enum": ["red", "green", "blue"]}]

    def ask(i: int):
        return client.chat.completions.create(model="m", messages=ASK, max_tokens=60, temperature=1.0, seed=i,
                                              response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for answer, schema in zip(answers, schemas):
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


@pytest.fixture(scope="module")
def reference_engine(family):
    name, folder, _, _ = family
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield moe_local.load(folder, device="cpu", dtype="fp32", ctx_size=CTX)
    torch.set_num_threads(threads)


def test_logprobs_are_the_log_softmax_of_the_engines_logits(family, reference_engine):
    name, folder, server, client = family
    if name != "qwen3_moe":
        pytest.skip("once is enough")
    answer = client.chat.completions.create(model="m", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    entries = answer.choices[0].logprobs.content
    prompt = reference_engine.tokenizer.render_chat(ASK)
    reference_engine.tokens = []
    ids = list(reference_engine.generate(prompt, 6, moe_local.generate.SamplingParams(temperature=0)))
    logits = reference_engine.logits(prompt + ids)[len(prompt) - 1 : len(prompt) - 1 + len(ids)]  # [n, V]
    want = torch.log_softmax(logits.float(), -1)
    assert len(entries) == len(ids)
    for entry, token, row in zip(entries, ids, want):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest
    streamed = [c for c in client.chat.completions.create(model="m", messages=ASK, max_tokens=6, temperature=0, logprobs=True, stream=True)]
    got = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert got == pytest.approx([e.logprob for e in entries], abs=1e-4)
    completion = client.completions.create(model="m", prompt="def f(", max_tokens=4, temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and "".join(lp.tokens) == completion.choices[0].text and lp.text_offset[0] == 0


def test_logit_bias_decides_the_tokens(family):
    name, folder, server, client = family
    if name != "qwen3_moe":
        pytest.skip("once is enough")
    token = 300
    answer = client.completions.create(model="m", prompt="x", max_tokens=5, temperature=0, logit_bias={str(token): 100}, logprobs=0)
    assert answer.choices[0].logprobs.tokens == [reference_token(folder, token).replace("Ġ", " ")] * 5


def test_run_json_schema_answers_json_that_validates(tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "n"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    done = moe_local_cli("run", "-p", "def f(", "-n", "100", "--json-schema", str(tmp_path / "schema.json"), "--json", "--temperature", "1",
                         "--seed", "2", "--dtype", "fp32", "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    jsonschema.validate(json.loads(result["text"]), schema)
    assert result["stats"]["finish_reason"] == "stop"
    (tmp_path / "bad.json").write_text('{"type": "objec"}')
    bad = moe_local_cli("run", "-p", "x", "--json-schema", str(tmp_path / "bad.json"))
    assert bad.returncode != 0 and "--json-schema" in bad.stderr and "Traceback" not in bad.stderr


def test_the_anthropic_client_gets_messages_tool_use_and_its_stream_events(family):
    name, folder, server, _ = family
    if name in ("glm4_moe", "mixtral"):
        pytest.skip("two families are enough")
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)  # sends x-api-key
    tools = [{"name": "get_weather", "description": "The weather in a city.", "input_schema": schema_of(WEATHER)}]
    ask = dict(model="m", max_tokens=80, system="You help.", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
               tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, extra_body={"temperature": 0})  # this client sends no temperature of its own
    message = client.messages.create(**ask)
    assert message.stop_reason == "tool_use" and message.usage.output_tokens > 0
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, schema_of(WEATHER))

    with client.messages.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events]
    assert sum(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events) > 3  # as it is written
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(kinds)
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(use.name, use.input)] and final.stop_reason == "tool_use"

    turn = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}]
    then = client.messages.create(model="m", max_tokens=5, messages=turn, tools=tools, stop_sequences=["\n\n\n"])
    assert then.stop_reason in ("end_turn", "max_tokens", "tool_use") and then.content
    counted = client.messages.count_tokens(model="m", messages=turn, tools=tools)
    assert counted.input_tokens == then.usage.input_tokens

    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}])
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(model="m", max_tokens=1, messages=turn[:1])


def test_anthropic_stop_sequence_and_thinking_as_anthropics_api_has_them(family):
    name, folder, server, _ = family
    if name != "qwen3_moe":
        pytest.skip("once is enough")
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    tools = [{"name": "get_weather", "description": "The weather in a city.", "input_schema": schema_of(WEATHER)}]
    ask = dict(model="m", max_tokens=40, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
               tool_choice={"type": "tool", "name": "get_weather"}, stop_sequences=["zzz", '"name"'])  # the forced call writes "name"
    message = client.messages.create(**ask)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", '"name"')
    with client.messages.stream(**ask) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", '"name"')
    # thinking is off unless asked: Qwen3's template then writes an empty <think></think> for the model
    turn = [{"role": "user", "content": "Why?"}]
    off = client.messages.count_tokens(model="m", messages=turn).input_tokens
    on = client.messages.count_tokens(model="m", messages=turn, thinking={"type": "enabled", "budget_tokens": 1024}).input_tokens
    assert off == on + len(reference_tokenizer(folder).encode("<think>\n\n</think>\n\n"))


def test_chat_template_kwargs_switch_thinking_as_vllm_and_llama_server_take_them(family):
    name, folder, server, client = family
    if name not in ("qwen3_moe", "glm4_moe"):  # GLM-4.5's <think> is a special token: its reasoning is read apart
        pytest.skip("Qwen3's and GLM-4.5's switch")
    turn = [{"role": "user", "content": "Why?"}]
    reference = reference_tokenizer(folder)
    off = {"chat_template_kwargs": {"enable_thinking": False, "not_in_the_template": [1, {"a": None}]}}  # the latter changes nothing
    answer = client.chat.completions.create(model="m", messages=turn, max_tokens=3, temperature=0, extra_body=off)
    want = reference.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False)
    assert answer.usage.prompt_tokens == len(want)
    # the same ids sent as a completion's prompt: all but the last are found in the cache the chat left, the answer is the same
    same = client.completions.create(model="m", prompt=want, max_tokens=3, temperature=0)
    assert same.usage.prompt_tokens_details.cached_tokens == len(want) - 1 and same.choices[0].text == answer.choices[0].message.content
    assert getattr(answer.choices[0].message, "reasoning_content", None) is None
    streamed = list(client.chat.completions.create(model="m", messages=turn, max_tokens=3, temperature=0, extra_body=off, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer.choices[0].message.content
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in streamed if c.choices)
    on = client.chat.completions.create(model="m", messages=turn, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert on.usage.prompt_tokens == len(reference.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_chat_template_kwargs_that_cannot_be_meant_are_one_line(family):
    name, folder, server, client = family
    if name != "qwen3_moe":
        pytest.skip("once is enough")
    turn = [{"role": "user", "content": "Why?"}]
    # a switch that is not a boolean (Qwen3's template would take the string "false" for on), what the server renders
    # with, a reasoning effort that is no level; a completion's prompt has no template to take them
    for kwargs, message in (({"enable_thinking": "false"}, 'chat_template_kwargs.enable_thinking must be true or false, not "false"'),
                            ({"messages": []}, "chat_template_kwargs.messages is set by the server"),
                            ({"eos_token": "x"}, "chat_template_kwargs.eos_token is set by the server"),
                            ({"reasoning_effort": "max"}, "reasoning effort is low, medium or high, not 'max'")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=turn, max_tokens=1, extra_body={"chat_template_kwargs": kwargs})
        assert refused.value.body["param"] == "chat_template_kwargs" and message in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="'chat_template_kwargs' is for /v1/chat/completions"):
        client.completions.create(model="m", prompt="Why?", max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}})


def test_gemma4_thinking_when_asked_is_its_templates_think_switch(family):
    name, folder, server, _ = family
    if name != "gemma4":
        pytest.skip("Gemma 4's")
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    turn = [{"role": "user", "content": "Why?"}]
    reference = reference_tokenizer(folder)
    for enabled in (False, True):
        asked = {"thinking": {"type": "enabled", "budget_tokens": 1024}} if enabled else {}
        want = reference.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=enabled)
        assert client.messages.count_tokens(model="m", messages=turn, **asked).input_tokens == len(want)


def anthropic_events(message: anthropic_api.Message, outputs: list[Output]) -> list[dict]:
    return [json.loads(event.split("data: ", 1)[1]) for output in outputs for event in message.step(output)]


def test_thinking_comes_back_as_thinking_blocks_only_when_asked():
    outputs = [Output("<think>\nWhy"), Output(" not.\n</th"), Output("ink>\n\nBecause."), Output("", finish_reason="stop", completion_tokens=9)]
    whole = anthropic_api.Message("m", 5, None, Thinking(opened=False), show=True).whole(outputs)
    assert whole["content"] == [{"type": "thinking", "thinking": "\nWhy not.\n", "signature": ""}, {"type": "text", "text": "Because."}]
    events = anthropic_events(anthropic_api.Message("m", 5, None, Thinking(opened=False), show=True), outputs)
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d["thinking"] for d in deltas if d["type"] == "thinking_delta") == "\nWhy not.\n"
    assert "".join(d["text"] for d in deltas if d["type"] == "text_delta") == "Because."
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["thinking", "text"]
    # not asked for: no thinking blocks, as Anthropic's API
    assert anthropic_api.Message("m", 5, None, Thinking(opened=False)).whole(outputs)["content"] == [{"type": "text", "text": "Because."}]
    hidden = anthropic_events(anthropic_api.Message("m", 5, None, Thinking(opened=False)), outputs)
    assert [e["content_block"]["type"] for e in hidden if e["type"] == "content_block_start"] == ["text"]
    # the template opened the reasoning (DeepSeek-V3.1's, Qwen3.5's): the answer starts inside it
    opened = anthropic_api.Message("m", 5, None, Thinking(opened=True), show=True).whole([Output("Hm.</think>Yes.", finish_reason="stop")])
    assert opened["content"] == [{"type": "thinking", "thinking": "Hm.", "signature": ""}, {"type": "text", "text": "Yes."}]


def test_gemma4s_thought_channel_is_reasoning_content_and_thinking_blocks():
    from moe_local.replies import GEMMA4_THOUGHT, Reply
    from moe_local.tools import FORMATS, ToolParser

    hidden = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", '<|"|>', "<eos>"})
    # as the server decodes Gemma 4's answer (special tokens written), cut anywhere
    text = '<|channel>thought\nParis, so ask.<channel|><|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
    outputs = [Output(text[i : i + 5]) for i in range(0, len(text), 5)] + [Output("", finish_reason="stop", completion_tokens=30)]

    def reply(tools: bool) -> Reply:
        return Reply(True, ToolParser(FORMATS["gemma4"], [WEATHER], hidden) if tools else None, thinking=Thinking(False, GEMMA4_THOUGHT), hidden=hidden)

    whole = reply(True).whole(outputs)
    assert whole["message"]["reasoning_content"] == "Paris, so ask." and whole["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]] == [("get_weather", {"city": "Paris", "days": 3})]
    assert whole["finish_reason"] == "tool_calls"
    streamed = [c for c in map(reply(True).step, outputs) if c]
    assert "".join(c["delta"].get("reasoning_content", "") for c in streamed) == "Paris, so ask."
    assert "".join(call["function"]["arguments"] for c in streamed for call in c["delta"].get("tool_calls", [])) == '{"city": "Paris", "days": 3}'
    # no tools: the answer after the thought, its special tokens not shown
    plain = [Output("<|channel>thought\nHm.<channel|>"), Output("Sunny<eos>", finish_reason="stop")]
    assert reply(False).whole(plain)["message"] == {"role": "assistant", "content": "Sunny", "reasoning_content": "Hm."}
    # Anthropic's: a thinking block where asked for, then the call
    message = anthropic_api.Message("m", 5, ToolParser(FORMATS["gemma4"], [WEATHER], hidden), Thinking(False, GEMMA4_THOUGHT), show=True, hidden=hidden)
    content = message.whole(outputs)["content"]
    assert [b["type"] for b in content] == ["thinking", "tool_use"] and content[0]["thinking"] == "Paris, so ask."
    assert content[1]["input"] == {"city": "Paris", "days": 3}


@pytest.fixture(scope="module")
def qwen36_tokenizer(tmp_path_factory):
    """Qwen3.6's tokenizer layout and real chat template (<think>, </think>, <tool_call> added but not special)."""
    from moe_local.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("qwen36")
    train_bytelevel_tokenizer(folder, **FAMILY_TOKENIZERS["qwen3_5_moe"])
    return load_tokenizer(folder)


def test_qwen36s_reasoning_is_reasoning_content_as_llama_server_and_vllm_give_it(qwen36_tokenizer):
    from moe_local.replies import Reply
    from moe_local.server import reasoning_reader, render_conversation
    from moe_local.tools import ToolParser, tool_format

    tok = qwen36_tokenizer
    turn = [{"role": "user", "content": "Weather in Paris?"}]
    # thinking on (its default): the generation prompt opens <think>, the answer starts inside the reasoning
    on = render_conversation(tok, turn, None, {})
    assert tok.decode(on, special=True).endswith("<|im_start|>assistant\n<think>\n")
    written = "The user asks.\n</think>\n\nSunny."
    outputs = [Output(written[i : i + 3]) for i in range(0, len(written), 3)] + [Output("", finish_reason="stop", completion_tokens=9)]
    whole = Reply(True, thinking=reasoning_reader(tok, on, None), hidden=tok.hidden_tokens).whole(outputs)["message"]
    assert whole == {"role": "assistant", "content": "Sunny.", "reasoning_content": "The user asks.\n"}
    reply = Reply(True, thinking=reasoning_reader(tok, on, None), hidden=tok.hidden_tokens)
    streamed = [c["delta"] for c in map(reply.step, outputs) if c]
    assert "".join(d.get("reasoning_content", "") for d in streamed) == "The user asks.\n"
    assert "".join(d.get("content", "") for d in streamed) == "Sunny."
    # it reasons, then calls (Qwen3.5's <function=...> format): the call parses after the reasoning
    parser = lambda: ToolParser(tool_format(tok), [WEATHER], tok.hidden_tokens)  # noqa: E731
    called = "Ask the tool.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
             "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    pieces = [Output(called[i : i + 4]) for i in range(0, len(called), 4)] + [Output("", finish_reason="stop", completion_tokens=30)]
    whole = Reply(True, parser(), thinking=reasoning_reader(tok, on, None), hidden=tok.hidden_tokens).whole(pieces)
    assert whole["message"]["reasoning_content"] == "Ask the tool.\n" and whole["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]] == [("get_weather", {"city": "Paris", "days": 3})]
    reply = Reply(True, parser(), thinking=reasoning_reader(tok, on, None), hidden=tok.hidden_tokens)
    streamed = [c["delta"] for c in map(reply.step, pieces) if c]
    assert "".join(d.get("reasoning_content", "") for d in streamed) == "Ask the tool.\n" and not any(d.get("content") for d in streamed)
    assert "".join(call["function"]["arguments"] for d in streamed for call in d.get("tool_calls", [])) == '{"city": "Paris", "days": 3}'
    # thinking off: the template writes the empty block in the prompt, the answer is all answer
    off = render_conversation(tok, turn, None, {"enable_thinking": False})
    assert tok.decode(off, special=True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    plain = [Output("Sunny, "), Output("surely.", finish_reason="stop")]
    assert Reply(True, thinking=reasoning_reader(tok, off, None)).whole(plain)["message"] == {"role": "assistant", "content": "Sunny, surely."}
    # a grammar writes the answer from its first token (tool_choice required, response_format): not read for reasoning
    assert reasoning_reader(tok, on, 'root ::= "{}"') is None


def test_qwen3s_think_tags_are_reasoning_content_on_the_openai_route(family):
    name, folder, server, client = family
    if name != "qwen3_moe":
        pytest.skip("Qwen3's template: the model writes <think> itself")
    think = reference_tokenizer(folder).convert_tokens_to_ids("<think>")
    ask = dict(model="m", messages=[{"role": "user", "content": "Why?"}], max_tokens=3, temperature=0, logit_bias={str(think): 100})
    # the model, made to, writes <think> three times: the first opens the reasoning, the others are in it
    answer = client.chat.completions.create(**ask).choices[0].message
    assert (answer.reasoning_content, answer.content) == ("<think><think>", "")
    streamed = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in streamed) == "<think><think>"
    assert not any(d.content for d in streamed)

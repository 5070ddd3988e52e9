"""Byte-level BPE tokenizers and the chat templates of Qwen3, Qwen3.5/3.6, Qwen2-MoE, GLM-4.5, DeepSeek-V3 and OLMoE,
and Gemma 4's byte-fallback BPE and template, as their checkpoints ship them: our prompt ids are transformers'
`apply_chat_template` ids, also for conversations with tools, calls, their results and earlier reasoning as the
server receives them."""

from __future__ import annotations

import datetime
import json

import pytest

import chat_templates
from builders import FAMILY_TOKENIZERS, GEMMA4_GENERATION_EOS, train_bytelevel_tokenizer, train_gemma_tokenizer
from moe_local.errors import TokenizerError
from moe_local.server import chat_messages, render_conversation
from moe_local.tools import ToolRequestError, tool_format
from moe_local.tokenizer import StreamDecoder, load_tokenizer

transformers = pytest.importorskip("transformers")

# glm47, deepseek_v31: GLM-4.5's and DeepSeek-V3's tokenizers with GLM-4.7's and DeepSeek-V3.1's templates
FAMILIES = [*FAMILY_TOKENIZERS, "gemma4", "glm47", "deepseek_v31"]
THINKING_FAMILIES = ["qwen3_moe", "qwen3_5_moe", "glm4_moe", "gemma4", "glm47", "deepseek_v31"]  # their templates read enable_thinking

CONVERSATIONS = {
    "one message": [{"role": "user", "content": "Why is the sky blue?"}],
    "system message": [
        {"role": "system", "content": "Answer in one paragraph."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    "two turns": [
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "    return 2 * x"},
        {"role": "user", "content": "And in C?"},
    ],
    "an answer that thought": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<think>\nEasy: four.\n</think>\n\n4"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    "non-ASCII and whitespace": [
        {"role": "user", "content": "naïve café: 🎉 日本語 — ½\n\n    indented  twice "},
        {"role": "assistant", "content": "Ça va ✓"},
        {"role": "user", "content": "\tencore 12345"},
    ],
}

PLAIN_TEXTS = [
    "Hello world",
    "naïve café: 🎉 日本語 — ½",
    "   three leading spaces\n\n\ttab 1234567",
    "x <think>y</think> z",
    "",
]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    made = {}
    for family, arguments in FAMILY_TOKENIZERS.items():
        made[family] = tmp_path_factory.mktemp(family)
        train_bytelevel_tokenizer(made[family], **arguments)
    made["gemma4"] = tmp_path_factory.mktemp("gemma4")
    train_gemma_tokenizer(made["gemma4"])
    made["glm47"] = tmp_path_factory.mktemp("glm47")
    train_bytelevel_tokenizer(made["glm47"], **{**FAMILY_TOKENIZERS["glm4_moe"], "chat_template": chat_templates.GLM47})
    made["deepseek_v31"] = tmp_path_factory.mktemp("deepseek_v31")
    train_bytelevel_tokenizer(made["deepseek_v31"], **{**FAMILY_TOKENIZERS["deepseek_v3"], "chat_template": chat_templates.DEEPSEEK_V31})
    return made


@pytest.fixture(scope="session")
def references(folders):
    return {family: transformers.AutoTokenizer.from_pretrained(folder) for family, folder in folders.items()}


def reference_ids(reference, messages, **options) -> list[int]:
    return reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False, **options)


# --- the prompt, as transformers renders and tokenizes it ----------------------------------------------------


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_equal_transformers_apply_chat_template(folders, references, family, conversation):
    messages = CONVERSATIONS[conversation]
    ours = load_tokenizer(folders[family])
    assert ours.render_chat_text(messages) == references[family].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == reference_ids(references[family], messages)


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", THINKING_FAMILIES)
def test_enable_thinking_reaches_the_template_as_in_transformers(folders, references, family, conversation, enable_thinking):
    messages = CONVERSATIONS[conversation]
    ours = load_tokenizer(folders[family])
    assert ours.template_reads("enable_thinking")
    expected = reference_ids(references[family], messages, enable_thinking=enable_thinking)
    assert ours.render_chat(messages, enable_thinking=enable_thinking) == expected


def test_qwen3_prompt_is_chatml_and_no_thinking_closes_an_empty_think_block(folders):
    tok = load_tokenizer(folders["qwen3_moe"])
    messages = CONVERSATIONS["an answer that thought"]
    head = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"  # the thinking of earlier turns is left out
        "<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.render_chat_text(messages) == head
    assert tok.render_chat_text(messages, enable_thinking=True) == head
    assert tok.render_chat_text(messages, enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert tok.bos_id is None and tok.render_chat(messages)[0] == tok.encode("<|im_start|>", bos=False)[0]


def test_glm45_template_comes_from_chat_template_jinja(folders):
    assert (folders["glm4_moe"] / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((folders["glm4_moe"] / "tokenizer_config.json").read_text())
    tok = load_tokenizer(folders["glm4_moe"])
    messages = CONVERSATIONS["one message"]
    assert tok.render_chat_text(messages) == "[gMASK]<sop><|user|>\nWhy is the sky blue?<|assistant|>"
    assert tok.render_chat_text(messages, enable_thinking=False) == (
        "[gMASK]<sop><|user|>\nWhy is the sky blue?/nothink<|assistant|>\n<think></think>"
    )


def test_deepseek_v3_prompt_has_its_bos_once(folders, references):
    tok = load_tokenizer(folders["deepseek_v3"])
    messages = CONVERSATIONS["system message"]
    assert tok.render_chat_text(messages) == "<｜begin▁of▁sentence｜>Answer in one paragraph.<｜User｜>Why is the sky blue?<｜Assistant｜>"
    ids = tok.render_chat(messages)
    assert ids[0] == tok.bos_id == 0 and ids.count(tok.bos_id) == 1
    assert tok.encode("hi")[0] == tok.bos_id  # add_bos_token: a raw prompt starts with BOS too


# --- conversations with tools, as the server receives them ------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "Its name"}, "days": {"type": "integer"},
                                     "units": {"type": "string", "enum": ["C", "F"]}}, "required": ["city"]}}}
PARIS = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
LYON = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon", "units": "C"}'}}
# OpenAI's wire format: calls' arguments as JSON text, reasoning_content beside content (vLLM's and DeepSeek's field)
AGENT_CONVERSATIONS = {
    "thinking, then a call and its result": [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "The user wants the weather: ask the tool.", "tool_calls": [PARIS]},
        {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": '{"sky": "clear", "high": 21}'},
    ],
    "two calls with text, two results, an answer, a new question": [
        {"role": "user", "content": "Paris and Lyon?"},
        {"role": "assistant", "content": "Looking both up.", "reasoning_content": "Two cities: two calls.", "tool_calls": [PARIS, LYON]},
        {"role": "tool", "tool_call_id": "call_0", "content": "clear, 21"},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain, 17"},
        {"role": "assistant", "content": "Paris is clear (21), Lyon rainy (17).", "reasoning_content": "Both answered."},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "reasoning of an earlier answer": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Easy: four."},
        {"role": "user", "content": "And 3 + 3?"},
    ],
}
TOOL_FAMILIES = ["qwen3_moe", "qwen3_5_moe", "glm4_moe", "gemma4", "glm47", "deepseek_v31"]  # templates with tool and thinking sections


def as_transformers_takes_it(messages: list[dict]) -> list[dict]:
    """The conversation with each call's arguments as an object, as transformers' chat templates read them."""
    def parsed(call):
        return {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
    return [{**m, "tool_calls": [parsed(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


# DeepSeek-V3.1's model card: "{system prompt}\n\n{tool_description}", the description of get_weather being this
WEATHER_FOR_DEEPSEEK31 = (
    "## Tools\nYou have access to the following tools:\n\n### get_weather\nDescription: The weather in a city.\n\nParameters: "
    '{"type": "object", "properties": {"city": {"type": "string", "description": "Its name"}, "days": {"type": "integer"}, "units": {"type": '
    '"string", "enum": ["C", "F"]}}, "required": ["city"]}\n\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n'
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>{additional_tool_calls}"
    "<｜tool▁calls▁end｜>\n\nWhere:\n- `tool_call_name` must be an exact match to one of the available tools\n- `tool_call_arguments` must be "
    "valid JSON that strictly follows the tool's Parameters Schema\n- For multiple tool calls, chain them directly without separators or spaces")


def as_deepseek31_takes_it(messages: list[dict]) -> list[dict]:
    """As DeepSeek-V3.1's model card has a conversation with tools written: their description after the system prompt
    (the template joins system messages with a blank line), the calls' arguments as JSON text, an answer that was only
    calls with empty content (the template adds it to a string)."""
    system = [m for m in messages if m["role"] == "system"]
    tools = {"role": "system", "content": WEATHER_FOR_DEEPSEEK31 if system else "\n\n" + WEATHER_FOR_DEEPSEEK31}
    rest = [{**m, "content": m["content"] or ""} for m in messages if m["role"] != "system"]
    return [*system, tools, *rest]


def as_gemma4_takes_it(messages: list[dict]) -> list[dict]:
    """As Google's documentation gives Gemma 4's template a conversation: the results of an answer's calls in its
    own message, as tool_responses of {name, response}, after its tool_calls."""
    out = []
    for m in as_transformers_takes_it(messages):
        if m["role"] == "tool":
            [name] = [c["function"]["name"] for c in out[-1]["tool_calls"] if c["id"] == m["tool_call_id"]]
            out[-1] = {**out[-1], "tool_responses": out[-1].get("tool_responses", []) + [{"name": name, "response": m["content"]}]}
        else:
            out.append(m)
    return out


@pytest.mark.parametrize("options", [{}, {"enable_thinking": False}], ids=["default", "no thinking"])
@pytest.mark.parametrize("conversation", AGENT_CONVERSATIONS)
@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_the_servers_prompt_for_tools_calls_and_results_is_transformers(folders, references, family, conversation, options):
    messages = AGENT_CONVERSATIONS[conversation]
    ours = load_tokenizer(folders[family])
    got = render_conversation(ours, chat_messages({"messages": messages}), [WEATHER], options)
    taken = as_gemma4_takes_it(messages) if family == "gemma4" else as_deepseek31_takes_it(messages) if family == "deepseek_v31" \
        else as_transformers_takes_it(messages)
    want = references[family].apply_chat_template(taken, tools=[WEATHER], add_generation_prompt=True, tokenize=True, return_dict=False, **options)
    assert got == want


def test_gemma4_writes_calls_in_its_notation_and_their_results_in_the_calling_turn(folders):
    tok = load_tokenizer(folders["gemma4"])
    text = tok.decode(render_conversation(tok, chat_messages({"messages": AGENT_CONVERSATIONS["thinking, then a call and its result"]}), [WEATHER], {}),
                      special=True)
    assert text.startswith('<bos><|turn>system\nYou help.<|tool>declaration:get_weather{description:<|"|>The weather in a city.<|"|>')
    assert text.endswith(
        "<|turn>user\nWeather in Paris?<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>{"sky": "clear", "high": 21}<|"|>}<tool_response|>'
        "<|channel>thought\n<channel|>"  # the answer goes on in the same turn, after an empty thought
    )
    orphan = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_0", "content": "21"}]
    with pytest.raises(ToolRequestError, match=r"messages\[1\] \(a tool result\) must follow the assistant message whose call it answers"):
        render_conversation(tok, chat_messages({"messages": orphan}), None, {})


def test_qwen36_writes_calls_as_xml_and_keeps_the_reasoning_of_the_current_turn(folders):
    tok = load_tokenizer(folders["qwen3_5_moe"])
    text = tok.decode(render_conversation(tok, chat_messages({"messages": AGENT_CONVERSATIONS["thinking, then a call and its result"]}), [WEATHER], {}),
                      special=True)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n{")
    assert text.endswith(
        "You help.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe user wants the weather: ask the tool.\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"sky": "clear", "high": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n"  # thinking is on unless enable_thinking is false
    )
    earlier = tok.render_chat_text(chat_messages({"messages": AGENT_CONVERSATIONS["reasoning of an earlier answer"]}), enable_thinking=False)
    assert earlier.endswith("<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n"
                            "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # reasoning before the last question is left out


def test_glm47_writes_calls_without_newlines_and_opens_the_reasoning(folders):
    tok = load_tokenizer(folders["glm47"])
    text = tok.decode(render_conversation(tok, chat_messages({"messages": AGENT_CONVERSATIONS["thinking, then a call and its result"]}), [WEATHER], {}),
                      special=True)
    assert text.endswith(  # the reasoning of the turn after the last question kept; the answer starts inside the reasoning
        "<|user|>Weather in Paris?<|assistant|><think>The user wants the weather: ask the tool.</think><tool_call>get_weather<arg_key>city</arg_key>"
        '<arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call><|observation|><tool_response>{"sky": "clear", '
        '"high": 21}</tool_response><|assistant|><think>')
    assert tok.render_chat_text(CONVERSATIONS["one message"], enable_thinking=False).endswith("<|assistant|></think>")
    assert tool_format(tok).name == "glm-4.7" and tool_format(load_tokenizer(folders["glm4_moe"])).name == "glm-4.5"


def test_deepseek31_has_the_tools_in_its_system_prompt_and_calls_without_fences(folders):
    tok = load_tokenizer(folders["deepseek_v31"])
    messages = AGENT_CONVERSATIONS["thinking, then a call and its result"]
    text = tok.decode(render_conversation(tok, chat_messages({"messages": messages}), [WEATHER], {}), special=True)
    assert text == (
        "<｜begin▁of▁sentence｜>You help.\n\n" + WEATHER_FOR_DEEPSEEK31 + "<｜User｜>Weather in Paris?<｜Assistant｜></think><｜tool▁calls▁begin｜>"
        '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
        '<｜tool▁output▁begin｜>{"sky": "clear", "high": 21}<｜tool▁output▁end｜>'  # the answer goes on after the result
    )
    assert tool_format(tok).name == "deepseek-v3.1" and tool_format(load_tokenizer(folders["deepseek_v3"])) is None  # V3's takes no tools


def test_qwen36_template_refuses_a_system_message_after_the_first_in_one_line(folders):
    tok = load_tokenizer(folders["qwen3_5_moe"])
    with pytest.raises(TokenizerError, match="chat template failed: System message must be at the beginning."):
        tok.render_chat([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}])


def test_gemma4_turns_end_at_turn_close_which_ends_generation(folders):
    tok = load_tokenizer(folders["gemma4"])
    generation = json.loads((folders["gemma4"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.token_id(t) for t in GEMMA4_GENERATION_EOS] == [tok.eos_id, tok.token_id("<turn|>"),
                                                                                              tok.token_id("<|tool_response>")]
    messages = CONVERSATIONS["two turns"]
    assert tok.render_chat_text(messages) == (
        "<bos><|turn>user\ndef f(x):<turn|>\n<|turn>model\nreturn 2 * x<turn|>\n<|turn>user\nAnd in C?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"  # an empty thought: thinking is off unless asked for
    )
    ids = tok.render_chat(messages)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and tok.encode("hi")[0] == tok.bos_id
    assert tok.render_chat_text(messages, enable_thinking=True).startswith("<bos><|turn>system\n<|think|><turn|>\n")
    assert tok.decode(tok.encode("<|turn>model\nHi there<turn|>", bos=False)) == "model\nHi there"  # the chat tokens are hidden


# --- plain text ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PLAIN_TEXTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_and_decode_match_transformers(folders, references, family, text):
    ours, reference = load_tokenizer(folders[family]), references[family]
    ids = ours.encode(text)
    assert ids == reference(text)["input_ids"]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    if not any(token in text for token in ours.added_tokens):  # decode hides special tokens
        assert ours.decode(ours.encode(text, bos=False)) == text


def test_decode_hides_special_tokens_and_keeps_qwen3s_think_tags(folders):
    tok = load_tokenizer(folders["qwen3_moe"])
    ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>", bos=False)
    assert tok.decode(ids) == "assistant\n<think>\nhm\n</think>\n\nok"  # <think> is added but not special


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
@pytest.mark.parametrize("text", ["naïve café: 🎉 日本語 — ½", "ünïcödé\n\n  ½ 🎉🎉", "Ça va ✓ <think>é</think>"])
def test_streamed_byte_level_pieces_join_to_the_text(folders, family, text):
    tok = load_tokenizer(folders[family])
    ids = tok.encode(text, bos=False)
    assert len(ids) > len(text.split())  # characters split across tokens, byte by byte
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_back_the_bytes_of_an_incomplete_character(folders):
    tok = load_tokenizer(folders["qwen3_moe"])
    ids = tok.encode("🎉", bos=False)
    assert len(ids) == 4  # one token per byte: the corpus has no emoji
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["", "", "", "🎉"]


def test_ids_past_the_vocabulary_decode_to_nothing(folders):
    tok = load_tokenizer(folders["qwen3_moe"])
    assert tok.decode([*tok.encode("ab", bos=False), tok.vocab_size + 5]) == "ab"


# --- the Jinja environment, as transformers' ------------------------------------------------------------------

JINJA_EXTRAS = {
    "tojson as transformers": "{{ {'name': 'café <b>', 'n': [1, 2]} | tojson }}|{{ {'a': 'é'} | tojson(indent=2) }}|{{ 'ü' | tojson(ensure_ascii=True) }}",
    "loop controls": "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
                     "{% for m in messages %}{% if m.role == 'user' %}{% continue %}{% endif %}[{{ m.content }}]{% endfor %}",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "extra variables": "{{ greeting | default('none') }} {{ tools is none }} {{ documents is none }} {{ add_generation_prompt }}",
    "None keys are dropped": "{% for m in messages %}{{ m.name is defined }}{% endfor %}",
    "special tokens": "{{ bos_token is defined }} {{ eos_token }} {{ pad_token }} {{ unk_token is defined }}",
}
MESSAGES = [
    {"role": "user", "content": "a", "name": None},
    {"role": "assistant", "content": "b"},
    {"role": "user", "content": "c"},
]


@pytest.mark.parametrize("extra", JINJA_EXTRAS)
def test_jinja_extras_render_as_in_transformers(folders, references, extra):
    template, tok = JINJA_EXTRAS[extra], load_tokenizer(folders["qwen3_moe"])
    tok.chat_template = template
    options = {"greeting": "hello"} if extra == "extra variables" else {}
    expected = references["qwen3_moe"].apply_chat_template(MESSAGES, chat_template=template, add_generation_prompt=True, tokenize=False, **options)
    assert tok.render_chat_text(MESSAGES, **options) == expected


def test_tojson_keeps_non_ascii_and_html_characters(folders):
    tok = load_tokenizer(folders["qwen3_moe"])
    tok.chat_template = JINJA_EXTRAS["tojson as transformers"]
    assert tok.render_chat_text(MESSAGES) == '{"name": "café <b>", "n": [1, 2]}|{\n  "a": "é"\n}|"\\u00fc"'


def test_strftime_now_writes_todays_date(folders):
    tok = load_tokenizer(folders["qwen3_moe"])
    tok.chat_template = "Today is {{ strftime_now('%Y-%m-%d') }}."
    before = datetime.date.today().isoformat()
    assert tok.render_chat_text(MESSAGES) in (f"Today is {before}.", f"Today is {datetime.date.today().isoformat()}.")


def test_raise_exception_in_a_real_template_is_one_clear_error(folders):
    tok = load_tokenizer(folders["qwen3_moe"])
    tok.chat_template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}"
    with pytest.raises(TokenizerError, match="chat template failed: Conversation roles must start with user"):
        tok.render_chat([{"role": "assistant", "content": "hi"}])


def test_template_reads_knows_which_options_a_template_takes(folders):
    assert load_tokenizer(folders["glm4_moe"]).template_reads("enable_thinking")
    for family in ("qwen2_moe", "deepseek_v3", "olmoe"):
        assert not load_tokenizer(folders[family]).template_reads("enable_thinking")


# --- the builder itself -------------------------------------------------------------------------------------


def test_bytelevel_builder_is_deterministic_and_sizes_the_vocabulary(tmp_path, folders):
    ids = train_bytelevel_tokenizer(tmp_path, **FAMILY_TOKENIZERS["glm4_moe"])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (folders["glm4_moe"] / name).read_bytes()
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 512 and max(ids.values()) == 511
    assert tok.eos_id == ids["<|endoftext|>"] and tok.bos_id is None


def test_bytelevel_builder_writes_the_generation_eos_list(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    ids = train_bytelevel_tokenizer(tmp_path, **FAMILY_TOKENIZERS["qwen3_moe"])
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"temperature": 0.6, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}


def test_every_family_template_is_in_the_builder():
    templates = {arguments["chat_template"] for arguments in FAMILY_TOKENIZERS.values()}
    assert templates == {chat_templates.QWEN3, chat_templates.QWEN36, chat_templates.QWEN2, chat_templates.GLM45, chat_templates.DEEPSEEK_V3,
                         chat_templates.OLMOE, chat_templates.GPT_OSS}
    assert train_gemma_tokenizer.__defaults__[0] == chat_templates.GEMMA4

"""Each family's tool-call format read from literal model output: calls with their arguments as JSON, the text
around them, malformed calls kept as text, and the same result whether the text comes whole or in pieces."""

from __future__ import annotations

import json

import pytest

from moe_local.tools import FORMATS, Call, Parsed, ToolParser

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]

PARIS = Call("get_weather", json.dumps({"city": "Paris", "days": 3}))
LYON = Call("get_weather", json.dumps({"city": "Lyon", "zip": "69001"}))
NOW = Call("get_time", "{}")

# format -> [(what the model wrote, what it says)]
CASES = {
    "qwen3": [
        ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
         Parsed("Let me look.\n", "", [PARIS])),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n<tool_call>\n'
         '{"name": "get_time", "arguments": {}}\n</tool_call>', Parsed("", "", [PARIS, NOW])),  # the newline between: no text
        ('<think>\nhm\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
         Parsed("<think>\nhm\n</think>\n\n", "", [NOW])),
        ("No tools needed: 4.", Parsed("No tools needed: 4.", "", [])),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>',  # not JSON
         Parsed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>', "", [])),
        ('<tool_call>\n{"name": "launch_missiles", "arguments": {}}\n</tool_call>',  # not a function offered
         Parsed('<tool_call>\n{"name": "launch_missiles", "arguments": {}}\n</tool_call>', "", [])),
        ('<tool_call>\n{"name": "get_time", "arguments": {}}', Parsed("", "", [NOW])),  # unclosed at the end
    ],
    "qwen3-coder": [
        ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
         "</parameter>\n</function>\n</tool_call>", Parsed("Checking.\n", "", [PARIS])),
        ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n<parameter=zip>\n69001\n</parameter>\n"
         "</function>\n</tool_call>", Parsed("", "", [LYON])),  # a string stays one though it reads as a number
        ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
         Parsed("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>", "", [])),
    ],
    "glm-4.5": [
        ("\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
         "<arg_value>3</arg_value>\n</tool_call>", Parsed("", "", [PARIS])),
        ("<tool_call>get_time\n</tool_call><tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Lyon</arg_value>\n"
         "<arg_key>zip</arg_key>\n<arg_value>69001</arg_value>\n</tool_call>", Parsed("", "", [NOW, LYON])),
        ("<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",
         Parsed("<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>", "", [])),
    ],
    "deepseek-v3": [
        ("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
         '{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n'
         "{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", Parsed("Sure.", "", [PARIS, NOW])),
        ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}<｜tool▁call▁end｜>'
         "<｜tool▁calls▁end｜>", Parsed("", "", [PARIS])),  # V3.1
        ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{city}\n```<｜tool▁call▁end｜>"
         "<｜tool▁calls▁end｜>", Parsed("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                                      "{city}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "", [])),
    ],
    "mistral": [
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, {"name": "get_time", '
         '"arguments": {}}]', Parsed("", "", [PARIS, NOW])),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}[TOOL_CALLS]get_time[ARGS]{}', Parsed("", "", [PARIS, NOW])),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": ', Parsed('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": ', "", [])),
    ],
    "harmony": [
        ('<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather '
         '<|constrain|>json<|message|>{"city": "Paris", "days": 3}', Parsed("", "Need weather.\n", [PARIS])),
        ('<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>4', Parsed("4", "Easy.\n", [])),
        ('<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}', Parsed("", "", [NOW])),
        ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": Paris}',
         Parsed('{"city": Paris}', "", [])),
    ],
}
ALL = [(name, text, want) for name, cases in CASES.items() for text, want in cases]


@pytest.mark.parametrize("name, text, want", ALL, ids=[f"{n}-{i}" for n, cases in CASES.items() for i in range(len(cases))])
def test_each_formats_calls_are_read_and_malformed_ones_stay_text(name, text, want):
    got = ToolParser(FORMATS[name], TOOLS).parse(text)
    assert (got.content, got.reasoning, got.calls) == (want.content, want.reasoning, want.calls)


@pytest.mark.parametrize("name, text, want", ALL, ids=[f"{n}-{i}" for n, cases in CASES.items() for i in range(len(cases))])
@pytest.mark.parametrize("piece", [1, 3, 7])
def test_streamed_pieces_add_up_to_the_whole_parse(name, text, want, piece):
    parser, got = ToolParser(FORMATS[name], TOOLS), Parsed()
    for i in range(0, len(text), piece):
        delta = parser.push(text[i : i + piece])
        got.content, got.reasoning, got.calls = got.content + delta.content, got.reasoning + delta.reasoning, got.calls + delta.calls
    delta = parser.finish()
    got.content, got.reasoning, got.calls = got.content + delta.content, got.reasoning + delta.reasoning, got.calls + delta.calls
    assert (got.content, got.reasoning, got.calls) == (want.content, want.reasoning, want.calls)


def test_a_call_streams_only_once_it_is_whole():
    parser = ToolParser(FORMATS["qwen3"], TOOLS)
    assert parser.push("Looking <tool").content == "Looking "  # "<tool" may start a call: held back
    assert parser.push('_call>\n{"name": "get_time", ').calls == []
    assert parser.push('"arguments": {}}\n</tool_call>').calls == [NOW]


def test_special_tokens_not_part_of_a_call_are_not_shown():
    parser = ToolParser(FORMATS["glm-4.5"], TOOLS, hidden=frozenset({"<think>", "</think>"}))
    assert parser.parse("<think>why</think>\nBecause.").content == "why\nBecause."


def test_a_call_without_a_required_argument_is_no_call():
    strict = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                                                       "required": ["city"]}}}]
    text = "<tool_call>get_weather\n</tool_call>"  # cut before its arguments
    assert ToolParser(FORMATS["glm-4.5"], strict).parse(text) == Parsed(text, "", [])

"""Each family's tool-call format read from literal model output: calls with their arguments as JSON, the text
around them, malformed calls kept as text, and the same result whether the text comes whole or in pieces."""

from __future__ import annotations

import json

import pytest

from moe_local.tools import FORMATS, Call, Delta, Parsed, Piece, ToolParser

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
    "glm-4.7": [
        ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
         Parsed("", "", [PARIS])),
        ("Both.<tool_call>get_time</tool_call><tool_call>get_weather<arg_key>city</arg_key><arg_value>Lyon</arg_value><arg_key>zip</arg_key>"
         "<arg_value>69001</arg_value></tool_call>", Parsed("Both.", "", [NOW, LYON])),  # a call without arguments, as GLM-4.7 writes one
        ("<tool_call>get_weather<arg_key>city</arg_key></tool_call>", Parsed("<tool_call>get_weather<arg_key>city</arg_key></tool_call>", "", [])),
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
    "gemma4": [
        ('Let me look.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>', Parsed("Let me look.", "", [PARIS])),
        ('<|tool_call>call:get_weather{city:<|"|>Lyon<|"|>,zip:<|"|>69001<|"|>}<tool_call|><|tool_call>call:get_time{}<tool_call|>',
         Parsed("", "", [LYON, NOW])),  # one after another, no separator
        ('<|tool_call>call:get_weather{city:Paris}<tool_call|>',  # a string not between <|"|>
         Parsed('<|tool_call>call:get_weather{city:Paris}<tool_call|>', "", [])),
        ("<|tool_call>call:launch_missiles{}<tool_call|>", Parsed("<|tool_call>call:launch_missiles{}<tool_call|>", "", [])),
        ("<|tool_call>call:get_time{}", Parsed("", "", [NOW])),  # unclosed at the end
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


def streamed(parser: ToolParser, text: str, size: int) -> tuple[Parsed, list[list]]:
    """The stream's pieces of `text` pushed `size` characters at a time, joined: its text, reasoning and calls, and each
    call's pieces ([name, fragment, fragment, ...])."""
    got, pieces = Parsed(), {}
    for i in range(0, len(text) + 1, size):
        delta = parser.push(text[i : i + size], final=i + size > len(text))
        got.content, got.reasoning = got.content + delta.content, got.reasoning + delta.reasoning
        for piece in delta.pieces:
            assert (piece.name is not None) == (piece.index not in pieces)  # the name comes once, first
            pieces.setdefault(piece.index, [piece.name]).append(piece.arguments)
    got.calls = [Call(p[0], "".join(p[1:])) for _, p in sorted(pieces.items())]
    return got, [pieces[i] for i in sorted(pieces)]


@pytest.mark.parametrize("name, text, want", ALL, ids=[f"{n}-{i}" for n, cases in CASES.items() for i in range(len(cases))])
@pytest.mark.parametrize("size", [1, 3, 7])
def test_streamed_pieces_add_up_to_the_whole_parse(name, text, want, size):
    got, pieces = streamed(ToolParser(FORMATS[name], TOOLS), text, size)
    assert (got.content, got.reasoning) == (want.content, want.reasoning)
    # where a call went wrong after its arguments began, the stream has it as far as it went (see ToolParser)
    assert got.calls == MALFORMED.get((name, text), want.calls)


# the calls a stream has begun where the whole text has none (malformed after the arguments began)
MALFORMED = {
    ("qwen3", CASES["qwen3"][4][0]): [Call("get_weather", '{"city": "Par')],
    ("qwen3-coder", CASES["qwen3-coder"][2][0]): [Call("get_weather", "{")],
    ("glm-4.5", CASES["glm-4.5"][2][0]): [Call("get_weather", "{")],
    ("deepseek-v3", CASES["deepseek-v3"][2][0]): [Call("get_weather", "{")],
    ("glm-4.7", CASES["glm-4.7"][2][0]): [Call("get_weather", "{")],  # "{city}" stops being JSON after its "{"
    ("mistral", CASES["mistral"][2][0]): [Call("get_weather", '{"city": ')],
    ("harmony", CASES["harmony"][3][0]): [Call("get_weather", '{"city": ')],
    ("gemma4", CASES["gemma4"][2][0]): [Call("get_weather", '{"city": ')],
}


@pytest.mark.parametrize("name, text", [(n, CASES[n][0][0]) for n in CASES])
def test_a_calls_arguments_stream_as_the_model_writes_them(name, text):
    _, pieces = streamed(ToolParser(FORMATS[name], TOOLS), text, 1)
    first = pieces[0]
    assert first[0] == "get_weather" and len([f for f in first[1:] if f]) > 2  # the name, then the arguments in several pieces


def test_a_call_begins_once_its_name_is_read_and_its_arguments_begin():
    parser = ToolParser(FORMATS["qwen3"], TOOLS)
    assert parser.push("Looking <tool").content == "Looking "  # "<tool" may start a call: held back
    assert parser.push('_call>\n{"name": "get_time", ').pieces == []
    assert parser.push('"arguments": {').pieces == [Piece(0, "get_time", "{")]
    assert parser.push('}}\n</tool').pieces == [Piece(0, None, "}")]
    assert parser.push("_call>", final=True) == Delta("", "", [])


def test_special_tokens_not_part_of_a_call_are_not_shown():
    parser = ToolParser(FORMATS["glm-4.5"], TOOLS, hidden=frozenset({"<think>", "</think>"}))
    assert parser.parse("<think>why</think>\nBecause.").content == "why\nBecause."


def test_a_call_without_a_required_argument_is_no_call():
    strict = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                                                       "required": ["city"]}}}]
    text = "<tool_call>get_weather\n</tool_call>"  # cut before its arguments
    assert ToolParser(FORMATS["glm-4.5"], strict).parse(text) == Parsed(text, "", [])


def test_gemma4_forced_calls_grammar_takes_what_its_template_writes_and_nothing_malformed(tmp_path):
    from builders import train_gemma_tokenizer
    from moe_local.grammar import Grammars, vocabulary
    from moe_local.tokenizer import load_tokenizer
    from moe_local.tools import call_grammar

    train_gemma_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    grammars = Grammars(vocabulary(tok, tok.vocab_size, [tok.eos_id]))
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                               "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
                                               "filter": {"type": "object", "properties": {"wet": {"type": "boolean"}, "max": {"type": "number"}}}},
              "required": ["city", "days"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}, {"type": "function", "function": {"name": "get_time"}}]
    grammar = call_grammar(FORMATS["gemma4"], tools, "required", True, lambda text: tok.token_id(text) if text in tok.hidden_tokens else None)

    def takes(text: str) -> bool:
        constraint = grammars.constraint(grammar)
        return all(constraint.matcher.consume_token(t) for t in tok.encode(text, bos=False)) and constraint.matcher.is_accepting()

    calls = [{"function": {"name": "get_weather", "arguments": {"days": 3, "city": "Paris", "tags": ["b", "a"], "filter": {"wet": False, "max": 2.5}}}},
             {"function": {"name": "get_time", "arguments": {"zone": "UTC", "n": [1, -2.5]}}},
             {"function": {"name": "get_weather", "arguments": {"city": "", "days": 9}}}]
    written = tok.render_chat_text([{"role": "assistant", "content": "", "tool_calls": calls}], add_generation_prompt=False)
    written = written[written.index("<|tool_call>") : written.rindex("<tool_call|>") + len("<tool_call|>")]
    assert written.startswith('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,filter:{max:2.5,wet:false},tags:[<|"|>b<|"|>,<|"|>a<|"|>]}')
    assert takes(written)
    assert ToolParser(FORMATS["gemma4"], tools).parse(written).calls == [Call(c["function"]["name"], json.dumps(c["function"]["arguments"], sort_keys=True))
                                                                         for c in calls]
    for wrong in ['<|tool_call>call:get_weather{days:3}<tool_call|>',  # city is required
                  '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:10}<tool_call|>',  # days at most 9
                  '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,tags:[<|"|>c<|"|>]}<tool_call|>',  # not in the enum
                  '<|tool_call>call:get_weather{days:3,city:<|"|>Paris<|"|>}<tool_call|>',  # not in the template's order
                  '<|tool_call>call:launch{}<tool_call|>']:
        assert not takes(wrong), wrong


TEMPLATES_WRITE = {  # format -> (tokenizer layout, template, what the template writes for PARIS then NOW)
    "glm-4.7": ("glm4_moe", "GLM47", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>"
                                     "<arg_value>3</arg_value></tool_call><tool_call>get_time</tool_call>"),
    "deepseek-v3.1": ("deepseek_v3", "DEEPSEEK_V31", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}'
                                                    "<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
}


@pytest.mark.parametrize("name", TEMPLATES_WRITE)
def test_forced_calls_grammar_takes_what_the_template_writes(tmp_path, name):
    import chat_templates
    from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer
    from moe_local.grammar import Grammars, vocabulary
    from moe_local.tokenizer import load_tokenizer
    from moe_local.tools import call_grammar, tool_format, with_text_arguments

    layout, template, want = TEMPLATES_WRITE[name]
    train_bytelevel_tokenizer(tmp_path, **{**FAMILY_TOKENIZERS[layout], "chat_template": getattr(chat_templates, template)})
    tok = load_tokenizer(tmp_path)
    assert tool_format(tok) is FORMATS[name]
    calls = [{"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
             {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {}}}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    if name == "deepseek-v3.1":  # its template joins the arguments to strings
        messages = with_text_arguments(messages)
    written = tok.render_chat_text(messages, add_generation_prompt=False)
    assert want in written
    grammar = call_grammar(FORMATS[name], TOOLS, "required", True, lambda text: tok.token_id(text) if text in tok.hidden_tokens else None)
    constraint = Grammars(vocabulary(tok, tok.vocab_size, [tok.eos_id])).constraint(grammar)
    assert all(constraint.matcher.consume_token(t) for t in tok.encode(want, bos=False)) and constraint.matcher.is_accepting()
    assert ToolParser(FORMATS[name], TOOLS).parse(want).calls == [PARIS, NOW]

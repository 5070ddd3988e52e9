"""Tool calls in each family's own format: which format a model's chat template writes (`tool_format`), and
`ToolParser`, which reads what the model generated (its text with the special tokens written, see
`Tokenizer.decode(special=True)`) into the answer's text, its reasoning and its calls, whole or as it streams.
A call the model wrote malformed (not JSON, no name, a function the request did not offer) stays text.
Plain Python: the server's HTTP process imports it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace

from moe_local.errors import MoeLocalError
from moe_local.grammar import json_lark
from moe_local.harmony import CHANNEL, CONSTRAIN, END, MESSAGE, START, is_harmony
from moe_local.tokenizer import Tokenizer


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object's text, as OpenAI's `function.arguments`: the model's own where it wrote JSON
    at: tuple = field(default=(), compare=False)  # where the call is in the text: its identity while it streams


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[Call] = field(default_factory=list)
    # calls begun but not whole, their arguments as far as they read as JSON: the one still being written (a scan
    # before the end) and those that broke off (malformed after their arguments began; their text is content)
    unfinished: list[Call] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """The next part of a call, as a stream sends it: the first piece of each call has its name, the others none;
    `arguments` is the text its arguments go on with (the pieces of one call joined are its arguments)."""

    index: int  # the call's place among the answer's calls
    name: str | None
    arguments: str


@dataclass
class Delta:
    """What a stream says next: text, reasoning, and pieces of calls (those of calls already begun come before
    the text, those that begin a call after it)."""

    content: str = ""
    reasoning: str = ""
    pieces: list[Piece] = field(default_factory=list)


class Format:
    """One family's way of writing calls. `scan(text, final)`: what `text` says so far; before the end
    (`final` False) only what no later text can change, so that each scan's content and reasoning start with the
    previous scan's and its calls too (what a stream has sent stays true), and each unfinished call's arguments
    with what they were (the call's `at` says which it is)."""

    name = ""

    def scan(self, text: str, final: bool, tools: dict[str, dict]) -> Parsed:
        raise NotImplementedError

    def call(self, name: str, parameters: dict, lit) -> str:
        """The Lark (llguidance's) of one call of `name` whose arguments validate against `parameters`; `lit(text)`
        is a literal, a special token where the vocabulary has one."""
        raise NotImplementedError

    separator = "\n"  # between calls, where there may be several
    parallel = True  # whether the format writes several calls in one answer
    results_in_call = False  # whether the template reads tool results as the calling message's tool_responses
    tools_in_system = False  # whether the tools go in the system message (`system_tools`), where the template takes none

    def system_tools(self, tools: list[dict]) -> str:
        """The tools as the model's documentation has them written into the system message."""
        raise NotImplementedError

    def rules(self, lit) -> list[str]:
        """Lark rules the calls' grammar refers to, beside its own."""
        return []


def _json(schema: dict) -> str:
    return json_lark(schema or None)


def _raw_string(schema: dict) -> str:
    """A string parameter as these formats write it, unquoted: one of its enum, or up to maxLength characters but "<"."""
    if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        return "(" + " | ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"]) + ")"
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    return f"/[^<]{{{low},{int(high)}}}/" if high is not None else f"/[^<]{{{low},}}/"


def _text_parameters(parameters: dict, lit, before_name: tuple[str, ...], after_name: tuple[str, ...],
                     after_value: tuple[str, ...]) -> str:
    """Qwen3-Coder's and GLM-4.5's arguments, one by one between markers (each a sequence of literals): a string
    as it is (without "<"), anything else as JSON of its schema; the required ones in the schema's order, then the
    others, each optional."""
    properties, required = parameters.get("properties") or {}, set(parameters.get("required") or ())
    parts = []
    for name in sorted(properties, key=lambda n: n not in required):
        schema = properties[name] if isinstance(properties[name], dict) else {}
        written = _raw_string(schema) if schema.get("type") == "string" else _json(schema)
        part = " ".join([*map(lit, before_name), lit(name), *map(lit, after_name), written, *map(lit, after_value)])
        parts.append(f"({part})" if name in required else f"({part})?")
    return " ".join(parts) or '""'


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


OUTSIDE_STRINGS = frozenset(" \t\n\r{}[],:-+.0123456789eEtrufalsn")


def json_extent(text: str, i: int) -> tuple[int, bool]:
    """From a "{" at text[i]: where the JSON object ends, as far as it is written (True), or where the text stops
    being the start of one (a character no JSON has there, or the text's end; False). A lexical check: a whole
    object's text is parsed after."""
    depth, string, escape = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                string = False
            elif c < " ":  # a control character: not in a JSON string
                return j, False
        elif c == '"':
            string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1, True
        elif c not in OUTSIDE_STRINGS:
            return j, False
    return len(text), False


def _arguments(body: str, i: int, name: str, tools: dict[str, dict]) -> tuple[Call | None, int, bool]:
    """The call of `name` whose arguments' JSON starts at body[i], as far as it is written: (call, end, whether its
    object closed); no call where `name` is not offered or no object starts there."""
    if name not in tools or i >= len(body) or body[i] != "{":
        return None, i, False
    end, closed = json_extent(body, i)
    return Call(name, body[i:end]), end, closed


def _take_call(body: str, i: int, name: str, tools: dict[str, dict], end: re.Pattern, calls: list[Call]) -> int | None:
    """Append to `calls` the call of `name` whose arguments start at body[i], as far as it is written; the index
    after the `end` that closes it, or None where the answer stops before that (no more calls can follow)."""
    call, i, closed = _arguments(body, i, name, tools)
    if call is None:
        return None
    calls.append(call)
    after = end.match(body, i)
    return after.end() if closed and after is not None else None


def _members(arguments: dict) -> str:
    """A dict's JSON as json.dumps writes it, less its closing brace: the text parameters written one by one
    (Qwen3-Coder's, GLM-4.5's) make as they come."""
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())


def _value(text: str, schema: dict | None):
    """A parameter written as text (Qwen3-Coder's <parameter>, GLM-4.5's <arg_value>): a string where the tool's
    schema says string (or says nothing and it is not JSON), else the JSON it spells."""
    if (schema or {}).get("type") == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call(name: str, arguments: dict | None, tools: dict[str, dict]) -> Call | None:
    """The call, if `name` is offered and `arguments` has every argument its schema requires."""
    if not isinstance(name, str) or name not in tools or not isinstance(arguments, dict):
        return None
    required = (tools[name].get("parameters") or {}).get("required") or []
    if not all(key in arguments for key in required if isinstance(key, str)):
        return None
    return Call(name, json.dumps(arguments, ensure_ascii=False))


class Delimited(Format):
    """Calls in blocks between an opening and a closing marker (to the end of the text where there is no closing
    one); text between blocks is the answer's."""

    open: str
    close: str | None

    def parse(self, body: str, tools: dict[str, dict]) -> list[Call] | None:
        """The calls of a whole block, or None where it is malformed."""
        raise NotImplementedError

    def partial(self, body: str, tools: dict[str, dict]) -> list[Call]:
        """The calls of a block as far as it is written (the last one's arguments so far): each call's arguments
        start its arguments' text when the block is whole."""
        raise NotImplementedError

    def _calls(self, body: str, tools: dict[str, dict], at: int) -> list[Call] | None:
        """`parse`'s calls, each with its arguments as the model wrote them where that is the JSON they read as."""
        calls = self.parse(body, tools)
        if not calls:
            return calls
        written = self.partial(body, tools)
        out = []
        for n, call in enumerate(calls):
            if n < len(written) and written[n].name == call.name and _same(written[n].arguments, call.arguments):
                call = written[n]
            out.append(replace(call, at=(at, n)))
        return out

    def scan(self, text: str, final: bool, tools: dict[str, dict]) -> Parsed:
        # Whitespace alone before or between calls (the templates' newlines) is no text of the answer: it is held
        # until what follows shows whether it is (text, a malformed call, an answer without calls).
        out, i = Parsed(), 0
        while True:
            j = text.find(self.open, i)
            gap = text[i:j] if j >= 0 else text[i:]
            if j < 0:
                gap = gap if final else gap[: len(gap) - held_back(gap, self.open)]
                if gap.strip() or (final and not out.calls):
                    out.content += gap
                return out
            if gap.strip():
                out.content += gap
            k = text.find(self.close, j + len(self.open)) if self.close else -1
            if k < 0 and not final:
                out.unfinished += [replace(c, at=(j, n)) for n, c in enumerate(self.partial(text[j + len(self.open):], tools))]
                return out
            body = text[j + len(self.open) : k if k >= 0 else len(text)]
            end = k + len(self.close) if k >= 0 else len(text)
            calls = self._calls(body, tools, j)
            if calls:
                out.calls += calls
            else:  # malformed: the model's text, as it wrote it
                out.content += ("" if gap.strip() else gap) + text[j:end]
                out.unfinished += [replace(c, at=(j, n)) for n, c in enumerate(self.partial(body, tools))]
            i = end


def _same(written: str, arguments: str) -> bool:
    try:
        return json.loads(written) == json.loads(arguments)
    except ValueError:
        return False


def _written_pairs(pattern: re.Pattern, body: str, i: int, schema: dict) -> dict:
    """The parameters (key, value: `pattern`'s groups) written whole one after another from body[i], whitespace
    between them."""
    out = {}
    for match in pattern.finditer(body, i):
        if body[i : match.start()].strip():
            break
        out[match.group(1).strip()] = _value(match.group(2), schema.get(match.group(1).strip()))
        i = match.end()
    return out


def _parameters(tool: dict | None) -> dict:
    return ((tool or {}).get("parameters") or {}).get("properties") or {}


CLOSE_BRACE_LINE = "}\n"


class Hermes(Delimited):
    """Qwen3's (and Hermes'): <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one block per call."""

    name, open, close = "qwen3", "<tool_call>", "</tool_call>"

    def call(self, name, parameters, lit):
        head = "\n" + json.dumps({"name": name})[:-1] + ', "arguments": '  # as the template writes a call
        return f"{lit(self.open)} {lit(head)} {_json(parameters)} {lit(CLOSE_BRACE_LINE)} {lit(self.close)}"

    HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"arguments"\s*:\s*')

    def partial(self, body, tools):
        head = self.HEAD.match(body)
        call = _arguments(body, head.end(), head.group(1), tools)[0] if head else None
        return [call] if call else []

    def parse(self, body, tools):
        call = _object(body.strip())
        if call is None:
            return None
        arguments = call.get("arguments", call.get("parameters"))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            arguments = _object(arguments)
        call = _call(call.get("name"), arguments, tools)
        return [call] if call else None


class QwenXml(Delimited):
    """Qwen3-Coder's and Qwen3.5's: <tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>...
    </function>\\n</tool_call>."""

    name, open, close = "qwen3-coder", "<tool_call>", "</tool_call>"

    def call(self, name, parameters, lit):
        inner = _text_parameters(parameters, lit, ("<parameter=",), (">\n",), ("\n</parameter>\n",))
        return f'{lit(self.open)} {lit(chr(10) + "<function=" + name + ">" + chr(10))} {inner} {lit("</function>" + chr(10))} {lit(self.close)}'
    FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.S)
    PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)
    HEAD = re.compile(r"\s*<function=([^>\n]+)>")

    def partial(self, body, tools):
        head = self.HEAD.match(body)
        if head is None or head.group(1).strip() not in tools:
            return []
        name = head.group(1).strip()
        return [Call(name, _members(_written_pairs(self.PARAMETER, body, head.end(), _parameters(tools[name]))))]

    def parse(self, body, tools):
        match = self.FUNCTION.fullmatch(body)
        if match is None:
            return None
        name, inner = match.group(1).strip(), match.group(2)
        schema = _parameters(tools.get(name))
        arguments = {k.strip(): _value(v, schema.get(k.strip())) for k, v in self.PARAMETER.findall(inner)}
        if self.PARAMETER.sub("", inner).strip():  # text that is no parameter
            return None
        call = _call(name, arguments, tools)
        return [call] if call else None


class Glm(Delimited):
    """GLM-4.5's: <tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n...</tool_call>."""

    name, open, close = "glm-4.5", "<tool_call>", "</tool_call>"

    def call(self, name, parameters, lit):
        inner = _text_parameters(parameters, lit, ("<arg_key>",), ("</arg_key>", "\n", "<arg_value>"), ("</arg_value>", "\n"))
        return f'{lit(self.open)} {lit(name + chr(10))} {inner} {lit(self.close)}'
    ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)

    def partial(self, body, tools):
        cut = min((i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0), default=-1)
        name = body[:cut].strip()
        if cut < 0 or name not in tools:
            return []
        return [Call(name, _members(_written_pairs(self.ARGUMENT, body, cut, _parameters(tools[name]))))]

    def parse(self, body, tools):
        name, _, rest = body.partition("<arg_key>")
        name, rest = name.strip(), "<arg_key>" + rest if rest else ""
        schema = _parameters(tools.get(name))
        arguments = {k.strip(): _value(v, schema.get(k.strip())) for k, v in self.ARGUMENT.findall(rest)}
        if self.ARGUMENT.sub("", rest).strip():
            return None
        call = _call(name, arguments, tools)
        return [call] if call else None


class Glm47(Glm):
    """GLM-4.7's (and GLM-5's, as SGLang's glm47 parser reads them): GLM-4.5's calls without the newlines,
    <tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...</tool_call>, one after another."""

    name = "glm-4.7"
    separator = ""

    def call(self, name, parameters, lit):
        inner = _text_parameters(parameters, lit, ("<arg_key>",), ("</arg_key>", "<arg_value>"), ("</arg_value>",))
        return f'{lit(self.open)} {lit(name)} {inner} {lit(self.close)}'


class DeepSeek(Delimited):
    """DeepSeek-V3's: <｜tool▁calls▁begin｜> then per call <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n
    ARGS\\n```<｜tool▁call▁end｜> (V3.1 and later: <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>), then
    <｜tool▁calls▁end｜>."""

    name, open, close = "deepseek-v3", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    separator = ""

    def call(self, name, parameters, lit):
        # the whole block around each call: a forced answer is one block of calls (see `call_grammar`)
        return (f'{lit("<｜tool▁call▁begin｜>")} {lit("function")} {lit("<｜tool▁sep｜>")} {lit(name + chr(10) + "```json" + chr(10))} '
                f'{_json(parameters)} {lit(chr(10) + "```")} {lit("<｜tool▁call▁end｜>")}')
    CALL = re.compile(r"\s*<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>\s*", re.S)
    FENCED = re.compile(r"([^\n]+)\n```(?:json)?\n(.*)\n```\s*", re.S)
    BEGIN = re.compile(r"\s*<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>", re.S)
    FENCE = re.compile(r"([^\n]+)\n```(?:json)?\n")
    END = re.compile(r"(?:\n```)?\s*<｜tool▁call▁end｜>")

    def partial(self, body, tools):
        calls, i = [], 0
        while (begin := self.BEGIN.match(body, i)) is not None:
            name, i = begin.group(1).strip(), begin.end()
            if name == "function":  # V3's: the name on its own line, then the arguments fenced
                fence = self.FENCE.match(body, i)
                if fence is None:
                    break
                name, i = fence.group(1).strip(), fence.end()
            i = _take_call(body, i, name, tools, self.END, calls)
            if i is None:
                break
        return calls

    def parse(self, body, tools):
        calls, i = [], 0
        while i < len(body):
            match = self.CALL.match(body, i)
            if match is None:
                return None
            head, rest = match.group(1).strip(), match.group(2)
            fenced = self.FENCED.fullmatch(rest)
            name, arguments = (fenced.group(1).strip(), fenced.group(2)) if fenced and head == "function" else (head, rest)
            call = _call(name, _object(arguments.strip()), tools)
            if call is None:
                return None
            calls.append(call)
            i = match.end()
        return calls or None


class DeepSeek31(DeepSeek):
    """DeepSeek-V3.1's: DeepSeek-V3's blocks with <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜> calls. Its chat
    template writes calls and results but not the tools: its model card has them in the system message
    (`system_tools`)."""

    name = "deepseek-v3.1"
    tools_in_system = True

    def call(self, name, parameters, lit):
        return f'{lit("<｜tool▁call▁begin｜>")} {lit(name)} {lit("<｜tool▁sep｜>")} {_json(parameters)} {lit("<｜tool▁call▁end｜>")}'

    def system_tools(self, tools):
        # the model card's tool description, word for word; the parameters as its json.dumps writes them
        described = "".join(f"\n### {t['function']['name']}\nDescription: {t['function'].get('description') or ''}\n\n"
                            f"Parameters: {json.dumps(t['function'].get('parameters') or {})}\n" for t in tools)
        return ("## Tools\nYou have access to the following tools:\n" + described +
                "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name"
                "<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>{additional_tool_calls}<｜tool▁calls▁end｜>\n\nWhere:\n"
                "- `tool_call_name` must be an exact match to one of the available tools\n"
                "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
                "- For multiple tool calls, chain them directly without separators or spaces")


class Mistral(Delimited):
    """Mistral's: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (Mixtral-8x22B, v3), or
    [TOOL_CALLS]NAME[ARGS]{...} per call (v11 and later); to the end of the answer."""

    name, open, close = "mistral", "[TOOL_CALLS]", None
    separator = ", "

    def call(self, name, parameters, lit):
        return f'{lit(json.dumps({"name": name})[:-1] + ", " + json.dumps("arguments") + ": ")} {_json(parameters)} {lit("}")}'

    LISTED = re.compile(r'\s*(?:\[|,)\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"arguments"\s*:\s*')
    LISTED_END = re.compile(r'\s*(?:,\s*"id"\s*:\s*"[^"\\]*"\s*)?\}')

    def partial(self, body, tools):
        calls, i = [], 0
        if "[ARGS]" in body:
            for part in body.split(self.open):
                name, args, arguments = part.partition("[ARGS]")
                call = _arguments(arguments, 0, name.strip(), tools)[0] if args else None
                if call is None:
                    break
                calls.append(call)
            return calls
        while (head := self.LISTED.match(body, i)) is not None and (head.group().lstrip().startswith("[") == (not calls)):
            i = _take_call(body, head.end(), head.group(1), tools, self.LISTED_END, calls)
            if i is None:
                break
        return calls

    def parse(self, body, tools):
        if "[ARGS]" in body:
            calls = []
            for part in body.split(self.open):
                name, _, arguments = part.partition("[ARGS]")
                call = _call(name.strip(), _object(arguments.strip()), tools)
                if call is None:
                    return None
                calls.append(call)
            return calls
        try:
            listed = json.loads(body.strip())
        except ValueError:
            return None
        listed = listed if isinstance(listed, list) else [listed]
        calls = [_call(c.get("name"), c.get("arguments"), tools) if isinstance(c, dict) else None for c in listed]
        return calls if calls and all(calls) else None


QUOTE = '<|"|>'  # Gemma 4's string delimiter, one special token
BARE_KEY = re.compile(r"\s*([^\s:{}\[\],<]+)\s*:")
BARE_LITERAL = re.compile(r"[-+.0-9eEtrufalsn]*")  # a number, true, false or null, as JSON writes them


def gemma_json(text: str, i: int) -> tuple[str, int, bool]:
    """From a "{" at text[i]: the object Gemma 4 writes (keys bare, strings between <|"|>, numbers, true, false and
    null as JSON writes them) as JSON text, as far as it is written: (its JSON, where it ends, whether it closed).
    It stops where the text stops being such an object; what it returns of a text starts what it returns of any
    longer text (a key is written once its ":" is read, a string as its characters come)."""
    out, stack, expect, j = [], [], "value", i  # expect: "value", "key", "colon", "after" (a value: "," or a close)
    while j < len(text):
        c = text[j]
        if c in " \t\r\n":
            j += 1
        elif text.startswith(QUOTE, j) and expect in ("value", "key") and stack:
            k = text.find(QUOTE, j + len(QUOTE))
            if k < 0:  # a string still being written: its characters so far (a key's once it is whole)
                body = text[j + len(QUOTE):]
                body = body[: len(body) - held_back(body, QUOTE)]
                return "".join(out) + (json.dumps(body, ensure_ascii=False)[:-1] if expect == "value" else ""), len(text), False
            out.append(json.dumps(text[j + len(QUOTE) : k], ensure_ascii=False))
            expect, j = ("colon" if expect == "key" else "after"), k + len(QUOTE)
        elif QUOTE.startswith(text[j:]):  # the start of a <|"|>
            break
        elif c in "{[" and expect == "value":
            stack.append(c)
            out.append(c)
            expect, j = ("key" if c == "{" else "value"), j + 1
        elif c in "}]" and stack and "{[".index(stack[-1]) == "}]".index(c) and (expect == "after" or out[-1] == stack[-1]):
            stack.pop()
            out.append(c)
            expect, j = "after", j + 1
            if not stack:
                return "".join(out), j, True
        elif c == "," and expect == "after":
            out.append(", ")
            expect, j = ("key" if stack[-1] == "{" else "value"), j + 1
        elif c == ":" and expect == "colon":
            out.append(": ")
            expect, j = "value", j + 1
        elif expect == "key":
            key = BARE_KEY.match(text, j)
            if key is None:
                break
            out.append(json.dumps(key.group(1), ensure_ascii=False) + ": ")
            expect, j = "value", key.end()
        elif expect == "value" and stack:
            literal = BARE_LITERAL.match(text, j).group()
            if not literal:
                break
            out.append(literal)
            expect, j = "after", j + len(literal)
        else:
            break
    return "".join(out), j, False


def _gemma_string(schema: dict, lit) -> str:
    if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
        return "(" + " | ".join(f"{lit(QUOTE)} {json.dumps(v, ensure_ascii=False)} {lit(QUOTE)}" for v in schema["enum"]) + ")"
    return f"{lit(QUOTE)} {_raw_string(schema)} {lit(QUOTE)}"


def _gemma_members(properties: dict, required: set, lit) -> str:
    """The members of an object in Gemma 4's notation, as its template writes them (sorted by name, no spaces), each
    optional but the required ones: commas only between members written."""
    names = sorted(properties)
    members = [f'{lit(name + ":")} {_gemma_value(properties[name] if isinstance(properties[name], dict) else {}, lit)}' for name in names]
    after, first = '""', '""'  # the members from the n-th on, after one was written / with none written before
    for n in range(len(names) - 1, -1, -1):
        if names[n] in required:
            first, after = f"{members[n]} {after}", f'"," {members[n]} {after}'
        else:
            first, after = f"(({members[n]} {after}) | {first})", f'("," {members[n]})? {after}'
    return first


def _gemma_value(schema: dict, lit) -> str:
    """The Lark of a value in Gemma 4's notation that follows `schema`: strings (enums, lengths), numbers, booleans
    and null (as JSON, with their bounds), objects with their properties (the required ones), arrays of their items.
    An object without properties takes any members; what the notation's grammar here does not follow (a schema with
    no type or several, anyOf and the like) takes any value of the notation (`gemma_any`)."""
    kind = schema.get("type")
    if kind == "string" or (kind is None and isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"])):
        return _gemma_string(schema, lit)
    if kind in ("integer", "number", "boolean", "null"):
        return _json(schema)
    if kind == "object":
        if not isinstance(schema.get("properties"), dict) or not schema["properties"]:
            return "gemma_object"
        return f'"{{" {_gemma_members(schema["properties"], set(schema.get("required") or ()), lit)} "}}"'
    if kind == "array" and isinstance(schema.get("items"), dict):
        item, low, high = _gemma_value(schema["items"], lit), int(schema.get("minItems", 0)), schema.get("maxItems")
        if high is not None and int(high) == 0:
            return '"[" "]"'
        more = f'("," {item}){{{max(low - 1, 0)},{"" if high is None else int(high) - 1}}}'
        return f'"[" {item} {more} "]"' if low > 0 else f'"[" ({item} {more})? "]"'
    return "gemma_any"


def gemma_any_rules(lit) -> list[str]:
    """Lark rules of any value in Gemma 4's notation."""
    return [f"gemma_any: {lit(QUOTE)} /[^<]*/ {lit(QUOTE)} | gemma_object | gemma_list | " + _json({"type": ["number", "boolean", "null"]}),
            'gemma_object: "{" (/[^\\s:{}\\[\\],<"]+/ ":" gemma_any ("," /[^\\s:{}\\[\\],<"]+/ ":" gemma_any)*)? "}"',
            'gemma_list: "[" (gemma_any ("," gemma_any)*)? "]"']


class Gemma4(Delimited):
    """Gemma 4's: <|tool_call>call:NAME{KEY:VALUE,...}<tool_call|> per call, one after another, the arguments in
    Gemma's notation (`gemma_json`), sorted by name as the template writes them; the results go back in the calling
    turn (`results_in_call`)."""

    name, open, close = "gemma4", "<|tool_call>", "<tool_call|>"
    separator = ""
    results_in_call = True
    HEAD = re.compile(r"\s*call:([^{\s<]+)(?=\{)")

    def call(self, name, parameters, lit):
        return f'{lit(self.open)} {lit("call:" + name)} {_gemma_value({**parameters, "type": "object"}, lit)} {lit(self.close)}'

    def rules(self, lit):
        return gemma_any_rules(lit)

    def partial(self, body, tools):
        head = self.HEAD.match(body)
        if head is None or head.group(1) not in tools:
            return []
        return [Call(head.group(1), gemma_json(body, head.end())[0])]

    def parse(self, body, tools):
        head = self.HEAD.match(body)
        if head is None:
            return None
        arguments, end, closed = gemma_json(body, head.end())
        if not closed or body[end:].strip():
            return None
        call = _call(head.group(1), _object(arguments), tools)
        return [call] if call else None


class Harmony(Format):
    """gpt-oss's: messages of a header (`<|channel|>commentary to=functions.NAME <|constrain|>json`), `<|message|>`,
    the text, and an end; a message addressed to=functions.NAME is a call (its text the arguments), the final
    channel is the answer, the other channels reasoning (a newline after each message, as `ChannelStream`)."""

    name = "harmony"
    parallel = False  # a call ends the answer (<|call|>)

    def call(self, name, parameters, lit):
        return f'{lit(CHANNEL)} {lit("commentary to=functions." + name + " ")} {lit(CONSTRAIN)} {lit("json")} {lit(MESSAGE)} {_json(parameters)}'
    ENDS = re.compile(re.escape(END) + "|<\\|call\\|>|<\\|return\\|>|" + re.escape(START))
    RECIPIENT = re.compile(r"to=(\S+)")

    def scan(self, text, final, tools):
        out, i = Parsed(), 0
        while i < len(text):
            if text.startswith(START, i):
                i += len(START)
            m = text.find(MESSAGE, i)
            if m < 0:
                if final:  # a header never finished: its text is shown rather than lost
                    out.content += text[i:]
                return out
            header = text[i:m]
            end = self.ENDS.search(text, m + len(MESSAGE))
            body = text[m + len(MESSAGE) : end.start() if end else len(text)]
            closed = end is not None or final
            if not closed:  # the end of the text may be the start of an end marker
                body = body[: len(body) - max(held_back(body, marker) for marker in (END, START, "<|call|>", "<|return|>"))]
            recipient = self.RECIPIENT.search(header.replace(CONSTRAIN, " ").replace(CHANNEL, " "))
            channel = header.split(CHANNEL)[-1].replace(CONSTRAIN, " ").split()[:1] if CHANNEL in header else ["final"]
            if recipient and recipient.group(1).startswith("functions."):
                name, written = recipient.group(1)[len("functions."):], body.strip()
                call = _call(name, _object(written), tools) if closed else None
                if call:
                    out.calls.append(replace(call, arguments=written, at=(i, 0)))
                else:
                    begun = _arguments(written, 0, name, tools)[0]
                    out.unfinished += [replace(begun, at=(i, 0))] if begun else []
                    if not closed:
                        return out
                    out.content += body
            elif channel == ["final"]:
                out.content += body
            else:
                out.reasoning += body + ("\n" if closed and body and not body.endswith("\n") else "")
            if end is None:
                return out
            i = end.end() if end.group() != START else end.start()
        return out


def call_grammar(format: Format, tools: list[dict], choice: str, parallel: bool, special) -> str:
    """The Lark grammar of an answer that is only calls, in `format`: of any of `tools` (choice "required") or of
    the one named; several where `parallel` and the format allows. `special(text)`: the id of a special token
    with that text, or None (then the literal is the text's bytes)."""
    def lit(text: str) -> str:
        token = special(text)
        return f"<[{token}]>" if token is not None else json.dumps(text, ensure_ascii=False)

    offered = [t["function"] for t in tools if choice == "required" or t["function"]["name"] == choice]
    rules = [f"call_{i}: {format.call(f['name'], f.get('parameters') or {}, lit)}" for i, f in enumerate(offered)]
    call = " | ".join(f"call_{i}" for i in range(len(offered)))
    calls = f"call ({lit(format.separator) if format.separator else ''} call)*" if parallel and format.parallel else "call"
    if isinstance(format, DeepSeek):
        calls = f"{lit(format.open)} {calls} {lit(format.close)}"
    elif isinstance(format, Mistral):
        calls = f'{lit(format.open)} "[" {calls} "]"'
    return "\n".join([f"start: {calls}", f"call: {call}", *rules, *format.rules(lit)])


FORMATS = {f.name: f for f in (Hermes(), QwenXml(), Glm(), Glm47(), DeepSeek(), DeepSeek31(), Mistral(), Harmony(), Gemma4())}


def tool_format(tokenizer: Tokenizer) -> Format | None:
    """The format the model's chat template tells it to write calls in; None where the template takes no tools (but
    DeepSeek-V3.1's, which writes calls and results, and whose model card has the tools in the system message)."""
    source = tokenizer.template_source
    reads = tokenizer.template_reads("tools")
    if is_harmony(tokenizer):
        return FORMATS["harmony"] if reads else None
    for marker, name in (("<function=", "qwen3-coder"), ("{function-name}<arg_key>", "glm-4.7"), ("<arg_key>", "glm-4.5"),
                         ("```json", "deepseek-v3"), ("tool▁calls▁begin", "deepseek-v3.1"), ("[TOOL_CALLS]", "mistral"),
                         ("<|tool_call>", "gemma4"), ("<tool_call>", "qwen3")):
        if marker in source:
            return FORMATS[name] if reads or FORMATS[name].tools_in_system else None
    return None


class ToolParser:
    """What a request's answer says, as it streams: `push(text)` takes the next text the model generated and
    returns what is now certain beyond what earlier pushes returned: answer text, reasoning, and the calls as the
    model writes them (a call begins once its function's name is read and offered and its arguments have begun;
    its arguments follow as they are written, while they read as JSON); `push(text, final=True)` the rest.

    The pieces add up to `parse` of the whole text: the same text and reasoning, the same calls. But a stream cannot
    take back a call it has begun: where a call turns out malformed after its arguments began (cut off by the end
    of the answer, not JSON, a required argument missing), the whole answer has its text and no call, and the
    stream has the call as far as it went and then the same text."""

    def __init__(self, format: Format, tools: list[dict], hidden: frozenset[str] = frozenset(), parallel: bool = True):
        self.format, self.tools, self.parallel = format, tools, parallel  # not parallel: the first call only
        self.functions = {t["function"]["name"]: t["function"] for t in tools}
        self.hidden = sorted(hidden, key=len, reverse=True)  # special tokens not to show in the answer (GLM's <think>)
        self.text = ""
        self.sent = Parsed()
        self.begun: dict[tuple, list] = {}  # a call's `at` -> [its index, the arguments sent]

    def push(self, text: str, final: bool = False) -> Delta:
        self.text += text
        return self._delta(self.format.scan(self.text, final, self.functions))

    def parse(self, text: str) -> Parsed:
        whole = self.format.scan(text, True, self.functions)
        return Parsed(self._shown(whole.content), whole.reasoning, whole.calls if self.parallel else whole.calls[:1])

    def _shown(self, text: str) -> str:
        for token in self.hidden:
            text = text.replace(token, "")
        return text

    def _delta(self, now: Parsed) -> Delta:
        content, reasoning = self._shown(now.content), now.reasoning
        going_on, beginning = [], []
        for call in sorted(now.calls + now.unfinished, key=lambda c: c.at):
            begun = self.begun.get(call.at)
            if begun is None and (self.parallel or not self.begun):
                self.begun[call.at] = [len(self.begun), call.arguments]
                beginning.append(Piece(len(self.begun) - 1, call.name, call.arguments))
            elif begun is not None and len(call.arguments) > len(begun[1]) and call.arguments.startswith(begun[1]):
                going_on.append(Piece(begun[0], None, call.arguments[len(begun[1]):]))
                begun[1] = call.arguments
        delta = Delta(content[len(self.sent.content):], reasoning[len(self.sent.reasoning):], going_on + beginning)
        self.sent = Parsed(content, reasoning)
        return delta


# --- OpenAI's side: the request's tools and the conversation's calls, checked, for the chat template -----------------


class ToolRequestError(MoeLocalError):
    """A request's tools, tool_choice or tool messages that cannot be taken; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict]  # OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: str  # "auto", "required", or the name of the one function to call
    parallel: bool  # whether the answer may hold more than one call


def tool_request(body: dict) -> ToolRequest | None:
    """The tools a chat request offers and how it asks for them to be used; None where it offers none or says
    tool_choice "none" (then the model is not told of them: its answer is text)."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise ToolRequestError("'functions' and 'function_call' are OpenAI's old names: send 'tools' and 'tool_choice'", "functions")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolRequestError("'tool_choice' asks for a tool, but the request has no 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolRequestError("'tools' must be a list of {type: function, function: {name, parameters}}", "tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolRequestError(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}", "tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise ToolRequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        names.append(function["name"])
    if len(set(names)) < len(names):
        raise ToolRequestError("two of 'tools' have the same name", "tools")
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolRequestError("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if choice is None or choice in ("auto", "required"):
        choice = choice or "auto"
    elif choice == "none":
        return None
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        choice = choice["function"].get("name")
        if choice not in names:
            raise ToolRequestError(f"tool_choice names {json.dumps(choice)}, which is not among 'tools'", "tool_choice")
    else:
        raise ToolRequestError("'tool_choice' must be none, auto, required or {type: function, function: {name}}", "tool_choice")
    return ToolRequest(tools, choice, parallel is not False)


def template_message(m: dict, i: int) -> dict:
    """An assistant message's tool_calls and a tool message's fields as chat templates read them: each call's
    arguments as an object (Qwen3, GLM-4.5 and gpt-oss write them out themselves), the call's id and name beside
    a tool result."""
    out = {"role": m["role"]}
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise ToolRequestError(f"messages[{i}] (a tool result) must have a tool_call_id", "messages")
        return out | {"tool_call_id": m["tool_call_id"]} | ({"name": m["name"]} if isinstance(m.get("name"), str) else {})
    calls = m.get("tool_calls")
    if m["role"] != "assistant" or not calls:
        return out
    if not isinstance(calls, list):
        raise ToolRequestError(f"messages[{i}].tool_calls must be a list", "messages")
    out["tool_calls"] = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolRequestError(f"messages[{i}].tool_calls[{j}] must be {{id, type: function, function: {{name, arguments}}}}", "messages")
        arguments = function.get("arguments") or "{}"
        parsed = _object(arguments) if isinstance(arguments, str) else arguments if isinstance(arguments, dict) else None
        if parsed is None:
            raise ToolRequestError(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object's text", "messages")
        out["tool_calls"].append({"id": call.get("id") or f"call_{i}_{j}", "type": "function",
                                  "function": {"name": function["name"], "arguments": parsed}})
    return out


def with_text_arguments(messages: list[dict]) -> list[dict]:
    """`messages` with each call's arguments as JSON text, for templates that join them to strings (DeepSeek-V3's)."""
    def text(call: dict) -> dict:
        return {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}
    return [{**m, "tool_calls": [text(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]



def with_results_in_calls(messages: list[dict]) -> list[dict]:
    """`messages` with the tool results that follow an assistant's calls in its message, as `tool_responses`
    ({name: the called function's, found by tool_call_id; response: the result's text}), where Gemma 4's template
    reads them (Google's later revision of it writes an OpenAI tool message the same way)."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "tool":
            out.append(m)
            continue
        calling = out[-1] if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") else None
        if calling is None:
            raise ToolRequestError(f"messages[{i}] (a tool result) must follow the assistant message whose call it answers", "messages")
        name = {c["id"]: c["function"]["name"] for c in calling["tool_calls"]}.get(m["tool_call_id"], m.get("name"))
        if name is None:
            raise ToolRequestError(f"messages[{i}].tool_call_id {json.dumps(m['tool_call_id'])} is none of the calls before it", "messages")
        out[-1] = {**calling, "tool_responses": [*calling.get("tool_responses", ()), {"name": name, "response": m["content"]}]}
    return out


def with_system_tools(messages: list[dict], text: str) -> list[dict]:
    """`messages` with `text` (the tools, see `Format.system_tools`) after the system prompt, as DeepSeek-V3.1's model
    card lays them out (`{system prompt}\\n\\n{tools}`, its template joining system messages with a blank line)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "system"), default=None)
    if last is None:
        return [{"role": "system", "content": "\n\n" + text}, *messages]
    return [*messages[: last + 1], {"role": "system", "content": text}, *messages[last + 1 :]]

"""Anthropic's Messages API as a translation (in the server's HTTP process, without torch): `chat_request` turns a
`POST /v1/messages` body into the OpenAI chat fields and messages the server already takes (system, text,
`tool_use` and `tool_result` blocks, tools and tool_choice, stop_sequences, thinking), and `Message` turns the
Batcher's Outputs back into Anthropic's message (content blocks: thinking, text, tool_use) or its stream of events
(message_start, content_block_start/delta/stop, message_delta, message_stop); `error_response` is its error object."""

from __future__ import annotations

import json
import secrets

from starlette.responses import JSONResponse

from moe_local.errors import MoeLocalError
from moe_local.params import Output
from moe_local.replies import Reader, Thinking, call_id
from moe_local.tools import Call, Piece, ToolParser

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


class RequestError(MoeLocalError):
    """A Messages request the translation cannot take."""


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    error = {"type": ERROR_TYPES.get(status, "api_error"), "message": message}
    return JSONResponse({"type": "error", "error": error}, status_code=status, headers=headers)


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in content):
        return "\n".join(b["text"] for b in content)
    raise RequestError(f"{where} must be a string or a list of text blocks")


def chat_request(body: dict) -> tuple[dict, list[dict]]:
    """(OpenAI chat fields, OpenAI messages) of a Messages request; "thinking" True/False/None among the fields."""
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise RequestError("max_tokens: an integer is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of {role, content} is required")
    out = [{"role": "system", "content": _text(body["system"], "system")}] if body.get("system") else []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"messages.{i}.role must be user or assistant")
        out += _message(m["role"], m.get("content"), f"messages.{i}")
    asked = {"messages": out, "max_tokens": body["max_tokens"], "stream": False}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("stop", "stop_sequences")):
        if body.get(theirs) is not None:
            asked[ours] = body[theirs]
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
            raise RequestError("tools must be a list of {name, description, input_schema}")
        asked["tools"] = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                            "parameters": t.get("input_schema") or {"type": "object"}}} for t in tools]
        choice = body.get("tool_choice") or {"type": "auto"}
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in ("auto", "any", "tool", "none"):
            raise RequestError("tool_choice must be {type: auto}, {type: any}, {type: tool, name} or {type: none}")
        asked["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            asked["parallel_tool_calls"] = False
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled", "adaptive"):
        asked["thinking"] = thinking["type"] != "disabled"
    return asked, out


def _message(role: str, content, where: str) -> list[dict]:
    """One Anthropic message as OpenAI messages: an assistant's tool_use blocks become its tool_calls, a user's
    tool_result blocks become tool messages (before the user's text)."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content blocks")
    texts, calls, results = [], [], []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning: the chat templates drop it too
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and role == "user":
            results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _text(block.get("content", ""), f"{where}.content.{j}.content")})
        else:
            raise RequestError(f"{where}.content.{j}: a {kind} block is not supported here (text, tool_use, tool_result)")
    text = "\n".join(texts)
    if role == "assistant":
        return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]
    return results + ([{"role": "user", "content": text}] if text or not results else [])


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


class Message:
    """One answer in Anthropic's shape, from the Batcher's Outputs: the calls read by `parser` (where tools were
    offered), the reasoning split off by `thinking` (`<think>...</think>`; a harmony model's comes apart already)
    and shown as thinking blocks only where the request asked for them (`show`), as Anthropic's API does;
    `hidden`: special tokens not to show (the text has them written where `thinking` or `parser` reads it)."""

    def __init__(self, model: str, input_tokens: int, parser: ToolParser | None, thinking: Thinking | None = None,
                 show: bool = False, hidden: frozenset[str] = frozenset()):
        self.id, self.model, self.input_tokens, self.parser = f"msg_{secrets.token_hex(12)}", model, input_tokens, parser
        self.reader, self.show = Reader(parser, thinking, hidden), show
        self.block: str | None = None  # the kind of the content block open in a stream
        self.index = -1
        self.calls: dict[int, int] = {}  # a call's index among the calls -> its content block's

    def said(self, text: str, reasoning: str, final: bool) -> tuple[str, str, list[Piece]]:
        """(answer text, reasoning to show, pieces of calls) of the next text, streamed (or whole: `final`)."""
        said = self.reader.push(text, final)
        return said.content, reasoning + said.reasoning if self.show else "", said.pieces

    def head(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}

    def whole(self, outputs: list[Output]) -> dict:
        said = self.reader.whole("".join(o.text for o in outputs))
        text, calls = said.content, said.calls
        reasoning = "".join(o.reasoning for o in outputs) + said.reasoning if self.show else ""
        content = ([{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []) + \
                  ([{"type": "text", "text": text}] if text or not calls else []) + [self.tool_use(c) for c in calls]
        last = outputs[-1]
        return {**self.head(), "content": content, **self.stop(last, len(calls)),
                "usage": {"input_tokens": last.prompt_tokens, "output_tokens": last.completion_tokens}}

    @staticmethod
    def tool_use(call: Call) -> dict:
        return {"type": "tool_use", "id": f"toolu_{call_id()}", "name": call.name, "input": json.loads(call.arguments)}

    @staticmethod
    def stop(last: Output, calls: int) -> dict:
        """stop_reason and stop_sequence: tool_use where the answer has calls, stop_sequence where one of the request's
        ended it."""
        if calls and last.finish_reason == "stop":
            return {"stop_reason": "tool_use", "stop_sequence": None}
        if last.stop_sequence is not None:
            return {"stop_reason": "stop_sequence", "stop_sequence": last.stop_sequence}
        return {"stop_reason": STOP_REASONS.get(last.finish_reason, "end_turn"), "stop_sequence": None}

    # --- streamed ---------------------------------------------------------------------------------------------------

    def start(self) -> list[str]:
        return [_event("message_start", {"message": self.head()})]

    def step(self, output: Output) -> list[str]:
        """The events `output` adds; after the last one, the message's end (or an error event)."""
        text, reasoning, pieces = self.said(output.text, output.reasoning, final=bool(output.finish_reason or output.error))
        events = []
        if reasoning:
            events += self._open("thinking", {"type": "thinking", "thinking": ""})
            events.append(_event("content_block_delta", {"index": self.index, "delta": {"type": "thinking_delta", "thinking": reasoning}}))
        for piece in [p for p in pieces if p.name is None]:  # the arguments of a call begun, in its block
            events.append(_event("content_block_delta", {"index": self.calls[piece.index], "delta": {"type": "input_json_delta", "partial_json": piece.arguments}}))
        if text:
            events += self._open("text", {"type": "text", "text": ""})
            events.append(_event("content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": text}}))
        for piece in [p for p in pieces if p.name is not None]:
            events += self._open("tool_use", {"type": "tool_use", "id": f"toolu_{call_id()}", "name": piece.name, "input": {}}, always=True)
            self.calls[piece.index] = self.index
            if piece.arguments:
                events.append(_event("content_block_delta", {"index": self.index, "delta": {"type": "input_json_delta", "partial_json": piece.arguments}}))
        if output.error:
            return events + [_event("error", {"error": {"type": "api_error", "message": output.error}})]
        if output.finish_reason:
            if self.block is None:  # an empty answer still has its text block
                events += self._open("text", {"type": "text", "text": ""})
            events += self._close()
            events.append(_event("message_delta", {"delta": self.stop(output, len(self.calls)),
                                                   "usage": {"output_tokens": output.completion_tokens}}))
            events.append(_event("message_stop", {}))
        return events

    def _open(self, kind: str, block: dict, always: bool = False) -> list[str]:
        if self.block == kind and not always:
            return []
        events = self._close()
        self.block, self.index = kind, self.index + 1
        return events + [_event("content_block_start", {"index": self.index, "content_block": block})]

    def _close(self) -> list[str]:
        if self.block is None:
            return []
        events = []
        if self.block == "thinking":  # the clients expect a signature; a local model has none to give
            events.append(_event("content_block_delta", {"index": self.index, "delta": {"type": "signature_delta", "signature": ""}}))
        self.block = None
        return events + [_event("content_block_stop", {"index": self.index})]

"""`moe-local serve`: an OpenAI-compatible HTTP API (chat completions, completions, models, health) on
Starlette and uvicorn, in two processes. This one keeps the engine and runs the `Batcher`; the HTTP
side runs in a process of its own (`front`), which checks and tokenizes requests, hands them over a pipe
and streams the outputs that come back. Apart, the two do not take turns at one interpreter lock: with
both in one process, eight streams of the demo model decoded 2.6-3.0x the tokens/s of one, in two
3.0-3.2x; the Batcher alone does 3.2-3.4x (docs/measurements.md)."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import multiprocessing
import os
import secrets
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe_local.errors import MoeLocalError, TokenizerError
from moe_local.grammar import GrammarError, answer_grammar, check, token_bytes
from moe_local.harmony import is_harmony
from moe_local.params import Output, SamplingParams, SamplingRangeError, max_new_tokens_default
from moe_local import anthropic_api
from moe_local.replies import Reply, Thinking, thought_markers
from moe_local.tokenizer import Tokenizer, check_reasoning_effort, load_tokenizer
from moe_local.tools import (ToolParser, ToolRequestError, call_grammar, template_message, tool_format, tool_request, with_results_in_calls,
                             with_system_tools, with_text_arguments)

if TYPE_CHECKING:  # the engine's side only: the HTTP process imports neither these nor torch
    from moe_local.batch import Request
    from moe_local.engine import Engine

MAX_BODY_BYTES = 4 * 2**20  # a request larger than this is refused (413): a full 128k-token prompt is ~0.5 MB
ROLES = ("system", "user", "assistant", "tool")
# Sampling fields a request may set: OpenAI's, and llama.cpp's extensions; SamplingParams checks the ranges
SAMPLING = {"temperature": (int, float), "top_p": (int, float), "seed": (int,), "top_k": (int,), "min_p": (int, float),
            "repeat_penalty": (int, float)}
UNSUPPORTED = ("echo", "suffix")
# chat_template_kwargs a request may not set: what the server renders with (a request's would replace the conversation,
# its tools or its special tokens) and apply_chat_template's own arguments, which vLLM refuses there too
RENDERED_BY_SERVER = ("messages", "tools", "documents", "add_generation_prompt", "chat_template", "tokenize")
SWITCHES = ("enable_thinking", "preserve_thinking")  # templates test them with `is true` / `is false`: a string "false" is on
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


def field(body: dict, name: str, kinds: tuple[type, ...], what: str):
    """body[name] if it is one of `kinds` (a bool is not a number), None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{name}' must be {what}, not {json.dumps(value)[:50]}", param=name)
    return value


def text_content(content, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}.content: only text parts are supported", param="messages")
        return "\n".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param="messages")


def template_kwargs(body: dict, tokenizer: Tokenizer) -> dict:
    """The chat template's variables a chat request sets in chat_template_kwargs, as vLLM, SGLang and llama-server take
    them (e.g. {"enable_thinking": false}): any JSON value, null for the template's default. A variable the template
    does not read changes nothing, as there (vLLM drops it, llama-server passes it on): clients send enable_thinking to
    every model. Refused: a variable the server renders with, a thinking switch that is not true or false (llama-server
    refuses a string too), a reasoning_effort that is no level."""
    kwargs = field(body, "chat_template_kwargs", (dict,), "an object of the chat template's variables")
    for name, value in (kwargs or {}).items():
        if name in RENDERED_BY_SERVER or name in tokenizer.special_tokens:
            raise ApiError(400, f"chat_template_kwargs.{name} is set by the server, not by a request", param="chat_template_kwargs")
        if name in SWITCHES and not isinstance(value, (bool, type(None))):
            raise ApiError(400, f"chat_template_kwargs.{name} must be true or false, not {json.dumps(value)[:50]}", param="chat_template_kwargs")
        if name == "reasoning_effort" and value is not None:
            try:
                check_reasoning_effort(value)
            except TokenizerError as e:
                raise ApiError(400, f"chat_template_kwargs.reasoning_effort: {e}", param="chat_template_kwargs") from None
    return {name: value for name, value in (kwargs or {}).items() if value is not None}


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param="messages")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, not {json.dumps(m.get('role'))}", param="messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""  # an answer that was only calls
        # an earlier answer's reasoning as vLLM, DeepSeek and llama.cpp send it back: templates that keep the reasoning of
        # an agent's turn (Qwen3.5/3.6, GLM-4.5) render it from this field
        reasoning = m.get("reasoning_content") if m["role"] == "assistant" else None
        if reasoning is not None and not isinstance(reasoning, str):
            raise ApiError(400, f"messages[{i}].reasoning_content must be a string", param="messages")
        try:
            out.append({**template_message(m, i), "content": text_content(content, f"messages[{i}]")}
                       | ({"reasoning_content": reasoning} if reasoning is not None else {}))
        except ToolRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
    return out


def usage(last: Output) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass(frozen=True)
class Settings:
    """What the HTTP process needs to know of the engine and the command line (it gets them pickled)."""

    model_id: str
    folder: Path | None  # the model's, where its tokenizer is; None: it has none
    vocab_size: int
    ctx_size: int
    sampling_defaults: SamplingParams
    max_tokens_default: int | None
    parallel: int = 4
    queue: int = 16
    api_key: str | None = None

    @classmethod
    def of(cls, engine: Engine, model_id: str, parallel: int = 4, queue: int = 16, api_key: str | None = None) -> Settings:
        if queue < 0:
            raise MoeLocalError(f"--queue must be 0 or more, not {queue}")
        return cls(model_id, engine.folder if engine.has_tokenizer else None, engine.cfg.vocab_size, engine.ctx_size,
                   engine.sampling_defaults(), max_new_tokens_default(engine.generation_config, None), parallel, queue, api_key)


class Job:
    """A request handed to the engine's process, and the queue its outputs arrive on."""

    def __init__(self, key: int):
        self.key = key
        self.outputs: asyncio.Queue[Output] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[Output]:
        """The outputs; those that arrived while the last one was being sent come as one (fewer events
        to send when many requests share the event loop)."""
        while True:
            output = await self.outputs.get()
            while not (output.finish_reason or output.error) and not self.outputs.empty():
                later = self.outputs.get_nowait()
                output = replace(later, text=output.text + later.text, reasoning=output.reasoning + later.reasoning,
                                 logprobs=output.logprobs + later.logprobs)
            yield output
            if output.finish_reason or output.error:
                return


GONE = ApiError(503, "the server's engine has stopped", "server_error")


class EngineLink:
    """The HTTP process's end of the pipe to the engine's: requests, cancellations and questions go over as
    (kind, key, value); outputs (a step's together) and answers come back, read by the event loop whenever
    the pipe has some."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.keys = itertools.count()
        self.jobs: dict[int, Job] = {}  # submitted, neither finished nor cancelled
        self.answers: dict[int, asyncio.Future] = {}
        self.stopping = False
        self.gone: Callable[[], None] = lambda: None  # called once the engine's process is gone

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.conn.fileno(), self._read)

    @property
    def load(self) -> int:
        """Requests submitted and not yet answered."""
        return len(self.jobs)

    def submit(self, fields: dict) -> Job:
        key = next(self.keys)
        job = self.jobs[key] = Job(key)
        self._send("submit", key, fields)
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the engine drops the request at its next step."""
        if self.jobs.pop(job.key, None) is not None:
            self._send("cancel", job.key)

    async def counts(self) -> dict:
        """The Batcher's counts now: requests running, waiting, and cancelled so far."""
        if self.conn.closed:
            raise GONE
        key = next(self.keys)
        future = self.answers[key] = self.loop.create_future()
        self._send("counts", key)
        return await future

    def stop_soon(self) -> None:
        """Shutting down: no new requests; the engine ends the running ones with an error."""
        self.stopping = True
        self._send("stop")

    def _send(self, kind: str, key: int | None = None, value=None) -> None:
        try:
            self.conn.send((kind, key, value))
        except OSError:  # the engine's process is gone
            self._gone()

    def _read(self) -> None:
        try:
            while self.conn.poll():
                kind, key, value = self.conn.recv()
                if kind == "outputs":  # a step's, [(key, Output)]
                    for key, output in value:
                        if key in self.jobs:
                            (self.jobs.pop(key) if output.finish_reason or output.error else self.jobs[key]).outputs.put_nowait(output)
                elif kind == "counts":
                    self.answers.pop(key).set_result(value)
        except (EOFError, OSError):
            self._gone()

    def _gone(self) -> None:
        if self.conn.closed:
            return
        self.loop.remove_reader(self.conn.fileno())
        self.conn.close()
        self.stopping = True
        for job in self.jobs.values():
            job.outputs.put_nowait(Output(error=str(GONE)))
        self.jobs.clear()
        for future in self.answers.values():
            future.set_exception(GONE)
        self.answers.clear()
        self.gone()


class Server:
    """The routes' state (in the HTTP process): the link to the engine, the tokenizer, the limits."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer | None, link: EngineLink):
        self.settings, self._tokenizer, self.link = settings, tokenizer, link
        self.model_id, self.api_key = settings.model_id, settings.api_key
        self.capacity = settings.parallel + settings.queue  # requests running or waiting; past it, 503
        self._pieces: list[bytes] | None = None
        self._pieces_thread = threading.Thread(target=self._work_out_pieces, name="moe-local token pieces", daemon=True)
        self._pieces_thread.start()
        self.created = int(time.time())

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise TokenizerError(f"{self.settings.folder or 'this model'} has no tokenizer (tokenizer.json or tokenizer.model)")
        return self._tokenizer

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            self.loop = asyncio.get_running_loop()
            self.link.start(self.loop)
            yield

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
        ]
        handlers = {ApiError: lambda request, e: e.response(),
                    HTTPException: lambda request, e: ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response(),
                    Exception: lambda request, e: ApiError(500, f"unexpected {type(e).__name__}: {e}", "server_error").response()}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, **await self.link.counts()})

    async def models(self, request: HttpRequest) -> Response:
        self.check_key(request)
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "moe-local"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: HttpRequest) -> Response:
        self.check_key(request)
        body = await read_body(request)
        prompt, reply, extra = self.chat(body, chat_messages(body))
        return await self.answer(request, body, prompt, "messages", "chat.completion", reply, extra)

    async def messages(self, request: HttpRequest) -> Response:
        """Anthropic's Messages API, translated to a chat request and back; errors in Anthropic's shape."""
        try:
            self.check_key(request)
            body = await read_body(request)
            prompt, message, extra, asked = self.anthropic_chat(body)
            job = self.submit(asked, prompt, "messages", extra)
            if body.get("stream"):
                return StreamingResponse(self.anthropic_stream(job, message), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return JSONResponse(message.whole(await self.collect(request, job)))
        except ApiError as e:
            return anthropic_api.error_response(e.status, str(e), e.headers)

    async def count_tokens(self, request: HttpRequest) -> Response:
        try:
            self.check_key(request)
            prompt, _, _, _ = self.anthropic_chat({"max_tokens": 1, **await read_body(request)})
            return JSONResponse({"input_tokens": len(prompt)})
        except ApiError as e:
            return anthropic_api.error_response(e.status, str(e), e.headers)

    def anthropic_chat(self, body: dict) -> tuple[list[int], anthropic_api.Message, dict, dict]:
        """(prompt, the answer's Message, the Request's fields beside the sampling ones, the chat request). Thinking
        as Anthropic's API has it: off unless the request turns it on. Off, the model is told not to think where its
        template has the switch (enable_thinking), and what it reasons anyway is left out; on, it comes back as
        thinking blocks (Qwen3's, GLM-4.5's, DeepSeek-V3.1's <think>...</think>, gpt-oss's analysis channel)."""
        try:
            asked, messages = anthropic_api.chat_request(body)
        except anthropic_api.RequestError as e:
            raise ApiError(400, str(e)) from None
        tokenizer = self.tokenizer
        thinking = bool(asked.pop("thinking", False))
        options = {"enable_thinking": thinking} if tokenizer.template_reads("enable_thinking") else {}
        prompt, reply, extra = self.chat(asked, chat_messages({"messages": messages}), options)
        message = anthropic_api.Message(self.model_id, len(prompt), reply.parser, reply.thinking, thinking, tokenizer.hidden_tokens)
        return prompt, message, extra, asked

    async def anthropic_stream(self, job: Job, message: anthropic_api.Message) -> AsyncIterator[str]:
        try:
            for event in message.start():
                yield event
            async for output in job:
                for event in message.step(output):
                    yield event
                if output.error:
                    return
        finally:
            self.link.cancel(job)

    def chat(self, body: dict, messages: list[dict], options: dict | None = None) -> tuple[list[int], Reply, dict]:
        """A chat request (OpenAI's fields; Anthropic's translated to them) as its prompt, its Reply and the Request
        fields beside the sampling ones; `options`: the template's variables, then chat_template_kwargs', then
        reasoning_effort's (a request's own field wins, as in vLLM)."""
        tokenizer = self.tokenizer
        effort = field(body, "reasoning_effort", (str,), "low, medium or high")
        options = (options or {}) | template_kwargs(body, tokenizer)
        try:
            options |= tokenizer.template_options(None, effort) if effort is not None else {}
        except MoeLocalError as e:  # not a level, or a template without the switch
            raise ApiError(400, str(e), param="reasoning_effort") from None
        parser, grammar = self.tools(body)
        try:
            prompt = render_conversation(tokenizer, messages, parser.tools if parser else None, options)
        except MoeLocalError as e:  # the template refuses this conversation (roles out of order, ...)
            raise ApiError(400, str(e), param="messages") from None
        # where the conversation alone ends: the next turn repeats it, and a model with linear-attention layers keeps
        # its state there (`Engine.prefill`'s marks), which the answer's rendering may not leave intact
        try:
            closed = render_conversation(tokenizer, messages, parser.tools if parser else None, options, add_generation_prompt=False)
        except MoeLocalError:  # a template that only renders a conversation with its generation prompt: no mark
            closed = []
        marks = (len(closed),) if 0 < len(closed) < len(prompt) and prompt[: len(closed)] == closed else ()
        grammar = grammar or self.answer_grammar(body)
        # gpt-oss: the final channel is the answer, the others reasoning_content (with tools, the parser splits them)
        channels = is_harmony(tokenizer) and parser is None
        logprobs = field(body, "logprobs", (bool,), "true or false")
        top = field(body, "top_logprobs", (int,), "an integer from 0 to 20")
        if top is not None and not 0 <= top <= 20:
            raise ApiError(400, f"'top_logprobs' must be from 0 to 20, not {top}", param="top_logprobs")
        if top is not None and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        # the reasoning as reasoning_content (thinking blocks on Anthropic's route), as llama-server and vLLM's reasoning
        # parsers give it: Qwen3's <think> tags (plain text), GLM-4.5's (special tokens: read with them written), Gemma 4's
        # thought channel
        split = reasoning_reader(tokenizer, prompt, grammar)
        reply = Reply(True, parser, (top or 0) if logprobs else None, self.pieces if logprobs else None, split, tokenizer.hidden_tokens)
        extra = {"channels": channels, "special": parser is not None or split is not None, "grammar": grammar, "logprobs": reply.top,
                 "marks": marks}
        return prompt, reply, extra

    def tools(self, body: dict) -> tuple[ToolParser | None, str | None]:
        """The reader of the answer's calls, where the request offers tools, and the grammar that forces a call where
        tool_choice asks for one."""
        try:
            asked = tool_request(body)
        except ToolRequestError as e:
            raise ApiError(400, str(e), param=e.param) from None
        if asked is None:
            return None, None
        format = tool_format(self.tokenizer)
        if format is None:
            raise ApiError(400, f"{self.model_id}'s chat template takes no tools", param="tools")
        parser = ToolParser(format, asked.tools, self.tokenizer.hidden_tokens, asked.parallel)
        if asked.choice == "auto":
            return parser, None
        special = lambda text: self.tokenizer.token_id(text) if text in self.tokenizer.hidden_tokens else None  # noqa: E731
        return parser, self.checked(call_grammar(format, asked.tools, asked.choice, asked.parallel, special), "tool_choice")

    def answer_grammar(self, body: dict) -> str | None:
        """response_format's grammar: any JSON object, or one that validates against the schema given; a harmony
        model writes it as its final channel's message."""
        asked = field(body, "response_format", (dict,), "an object")
        if asked is None or asked.get("type") == "text":
            return None
        if asked.get("type") == "json_object":
            schema = None
        elif asked.get("type") == "json_schema" and isinstance(asked.get("json_schema"), dict):
            schema = asked["json_schema"].get("schema", {})
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object", param="response_format")
        else:
            raise ApiError(400, "response_format must be {type: text}, {type: json_object} or {type: json_schema, json_schema: {name, schema}}",
                           param="response_format")
        try:
            return answer_grammar(self.tokenizer, schema)
        except GrammarError as e:
            raise ApiError(400, str(e), param="response_format") from None

    @staticmethod
    def checked(grammar: str, param: str) -> str:
        try:
            check(grammar)
        except GrammarError as e:
            raise ApiError(400, str(e), param=param) from None
        return grammar

    @property
    def pieces(self) -> list[bytes]:
        """Each token's bytes (what logprobs name them by), worked out at start on a thread (~4 s for 152k tokens)."""
        self._pieces_thread.join()
        if self._pieces is None:
            self._pieces = token_bytes(self.tokenizer)[0]
        return self._pieces

    def _work_out_pieces(self) -> None:
        if self._tokenizer is not None:
            self._pieces = token_bytes(self._tokenizer)[0]

    async def completions(self, request: HttpRequest) -> Response:
        self.check_key(request)
        body = await read_body(request)
        if body.get("chat_template_kwargs"):  # refused, not ignored: thinking turned off here would stay on unseen
            raise ApiError(400, "'chat_template_kwargs' is for /v1/chat/completions: a completion's prompt goes to the model "
                           "as it is, through no chat template", param="chat_template_kwargs")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt.strip():  # as `moe-local run -p ""` refuses it
                raise ApiError(400, "'prompt' is empty", param="prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = prompt  # token ids
            if not all(0 <= i < self.settings.vocab_size for i in ids):
                raise ApiError(400, f"'prompt' has token ids outside the vocabulary (0..{self.settings.vocab_size - 1})", param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string, a list of one string or a list of token ids", param="prompt")
        top = field(body, "logprobs", (int,), "an integer from 0 to 5")  # the legacy API's: how many alternatives
        if top is not None and not 0 <= top <= 5:
            raise ApiError(400, f"'logprobs' must be from 0 to 5, not {top}", param="logprobs")
        reply = Reply(False, None, top, self.pieces if top is not None else None)
        return await self.answer(request, body, ids, "prompt", "text_completion", reply, {"logprobs": top, "grammar": self.answer_grammar(body)})

    def shutting_down(self) -> None:
        """Ctrl-C or SIGTERM: end the running requests now (streams get an error event), so that uvicorn's
        graceful shutdown finds no connection left to wait for. Called in a signal handler."""
        self.loop.call_soon_threadsafe(self.link.stop_soon)

    def check_key(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        if "x-api-key" in request.headers:  # Anthropic's clients send the key so
            scheme, key = "bearer", request.headers["x-api-key"]
        else:
            scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110 11.1: `bearer` is `Bearer`); the key is compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
                           code="invalid_api_key")

    def generation(self, body: dict, prompt: list[int], prompt_field: str) -> dict:
        """The Request fields that `body` asks for, checked; `prompt_field` is where the prompt came from
        (`messages` or `prompt`), for the error object's `param`."""
        for name in UNSUPPORTED:
            if body.get(name):
                raise ApiError(400, f"'{name}' is not supported by moe-local", param=name)
        for name in ("n", "best_of"):
            if body.get(name) not in (None, 1):
                raise ApiError(400, f"'{name}' must be 1: moe-local answers one choice per request", param=name)
        given = {name: field(body, name, kinds, "a number" if float in kinds else "an integer") for name, kinds in SAMPLING.items()}
        try:
            params = replace(self.settings.sampling_defaults, **{k: v for k, v in given.items() if v is not None})
        except SamplingRangeError as e:  # said with the API's field name, not the command line's flag
            raise ApiError(400, f"'{e.field}' {e.rule}, not {json.dumps(given[e.field])}", param=e.field) from None
        penalties = {}
        for name in ("presence_penalty", "frequency_penalty"):
            value = field(body, name, (int, float), "a number")
            if value is not None and not -2 <= value <= 2:
                raise ApiError(400, f"'{name}' must be between -2 and 2", param=name)
            penalties[name] = float(value or 0)
        max_tokens = None
        for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
            value = field(body, name, (int,), "an integer")
            if value is not None and value < 1:
                raise ApiError(400, f"'{name}' must be at least 1, not {value}", param=name)
            max_tokens = value if value is not None else max_tokens
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
        if len(prompt) > self.settings.ctx_size:
            raise ApiError(400, f"the prompt takes {len(prompt)} tokens and the context holds {self.settings.ctx_size} "
                           "(the server's --ctx-size)", param=prompt_field, code="context_length_exceeded")
        if not prompt:
            raise ApiError(400, "the prompt is empty", param=prompt_field)
        return dict(prompt=prompt, max_tokens=max_tokens or self.settings.max_tokens_default, params=params, stop=stop,
                    logit_bias=self.logit_bias(body), **penalties)

    def logit_bias(self, body: dict) -> dict[int, float]:
        """OpenAI's logit_bias: {"token id": bias from -100 to 100}, added to the logits before sampling."""
        given = field(body, "logit_bias", (dict,), "an object of token ids and biases") or {}
        bias = {}
        for key, value in given.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < self.settings.vocab_size):
                raise ApiError(400, f"logit_bias: {json.dumps(key)} is not a token id (0..{self.settings.vocab_size - 1})", param="logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: the bias of token {key} must be a number from -100 to 100", param="logit_bias")
            bias[int(key)] = float(value)
        return bias

    async def answer(self, request: HttpRequest, body: dict, prompt: list[int], prompt_field: str, kind: str, reply: Reply,
                     extra: dict) -> Response:
        stream = field(body, "stream", (bool,), "true or false")
        options = field(body, "stream_options", (dict,), "an object") or {}
        include_usage = field(options, "include_usage", (bool,), "true or false")
        job = self.submit(body, prompt, prompt_field, extra)
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{secrets.token_hex(12)}",
                "created": int(time.time()), "model": self.model_id}
        if stream:
            return StreamingResponse(self.stream(job, head, kind, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        outputs = await self.collect(request, job)
        last = outputs[-1]
        return JSONResponse({**head, "object": kind, "choices": [reply.whole(outputs)], "usage": usage(last)})

    def submit(self, body: dict, prompt: list[int], prompt_field: str, extra: dict) -> Job:
        """Hands the request to the engine, if there is room."""
        fields = self.generation(body, prompt, prompt_field)
        if self.link.stopping:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if self.link.load >= self.capacity:
            raise ApiError(503, f"the server is busy: {self.link.load} requests are running or waiting; retry later",
                           "server_error", code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.link.submit({**fields, **extra})

    async def collect(self, request: HttpRequest, job: Job) -> list[Output]:
        """Every output of a request answered whole (not streamed); dropped if the client leaves."""
        watcher = asyncio.create_task(self.cancel_on_disconnect(request, job))
        try:
            outputs = [o async for o in job]
        finally:
            watcher.cancel()
            self.link.cancel(job)  # if it is still running (the client left), the batcher drops it
        if outputs[-1].error:
            raise ApiError(503 if self.link.stopping else 500, outputs[-1].error, "server_error")
        return outputs

    async def stream(self, job: Job, head: dict, kind: str, reply: Reply, include_usage: bool | None) -> AsyncIterator[str]:
        """Server-sent events. With stream_options.include_usage the usage comes once, as OpenAI sends it: in
        one more chunk after the one with finish_reason, with no choices (a client that adds up the usage of
        every chunk counts it once); without it, on the chunk with finish_reason, as llama.cpp's server sends it."""
        head = {**head, "object": f"{kind}.chunk" if kind == "chat.completion" else kind}
        try:
            if kind == "chat.completion":  # the role comes first
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            async for output in job:
                if output.error:
                    choice = reply.step(replace(output, error=None))
                    if choice is not None:
                        yield sse({**head, "choices": [choice]})
                    yield sse({"error": {"message": output.error, "type": "server_error", "param": None, "code": None}})
                    return
                choice = reply.step(output)
                if output.finish_reason is None:
                    if choice is not None:
                        yield sse({**head, "choices": [choice]})
                    continue
                last = {**head, "choices": [choice]}
                yield sse(last if include_usage else {**last, "usage": usage(output)})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(output)})
            yield sse("[DONE]")
        finally:  # also when the client went away (Starlette cancels this generator)
            self.link.cancel(job)  # if it is still running, the batcher drops it at its next step

    async def cancel_on_disconnect(self, request: HttpRequest, job: Job) -> None:
        """Once the body is read, the next ASGI message is the client leaving."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.link.cancel(job)


def reasoning_reader(tokenizer: Tokenizer, prompt: list[int], grammar: str | None) -> Thinking | None:
    """The reader of the answer's reasoning where the chat template marks it (not a harmony model's: its channels come
    apart in the engine; not where a grammar writes the answer from its first token, with no reasoning, though the
    prompt opened it, as GLM-4.7's and Qwen3.5's do); opened where the prompt ends in the opening marker (Qwen3.5/3.6's
    and DeepSeek-V3.1's with thinking on: the answer starts inside the reasoning), else read where the answer begins with
    it (Qwen3's: the model writes <think> itself; with thinking off, the templates' empty block is in the prompt and
    the answer is all answer)."""
    markers = thought_markers(tokenizer.template_source)
    if markers is None or is_harmony(tokenizer) or grammar is not None:
        return None
    return Thinking(tokenizer.decode(prompt[-4:], special=True).rstrip().endswith(markers[0].rstrip()), markers)


def render_conversation(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None, options: dict,
                        add_generation_prompt: bool = True) -> list[int]:
    """The prompt's ids. Tool results go in the calling message where the template reads them there (Gemma 4's); the
    tools go in the system message where the model's documentation puts them there (DeepSeek-V3.1's).
    Where the template refuses what OpenAI allows, it gets them as it takes them: calls' arguments as JSON text
    (DeepSeek-V3's joins them to strings), an empty description for a tool without one (gpt-oss's adds it to a
    string)."""
    format = tool_format(tokenizer)
    if format is not None and format.results_in_call:
        messages = with_results_in_calls(messages)
    if tools and format is not None and format.tools_in_system and not tokenizer.template_reads("tools"):
        messages, tools = with_system_tools(messages, format.system_tools(tools)), None
    try:
        return tokenizer.render_chat(messages, add_generation_prompt, tools, **options)
    except TokenizerError:
        described = [{**t, "function": {"description": "", **t["function"]}} for t in tools] if tools else tools
        if not any(m.get("tool_calls") for m in messages) and described == tools:
            raise
    return tokenizer.render_chat(with_text_arguments(messages), add_generation_prompt, described, **options)


async def read_body(request: HttpRequest) -> dict:
    """The JSON object in the request body, refusing bodies over MAX_BODY_BYTES."""
    too_large = ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening: `moe-local serve` opens it before it loads the model, so that a
    port in use is one line in a second, not after minutes of reading (and quantizing) the experts. Clients
    that connect meanwhile wait in its backlog until the HTTP process serves them."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        # socket.create_server's message repeats the address ("... (while attempting to bind on address ...)")
        why = os.strerror(e.errno) if isinstance(e.errno, int) and e.errno > 0 else e.strerror or str(e)  # a name lookup's errors are < 0
        raise MoeLocalError(f"cannot listen on {host}:{port}: {why}") from None


class Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.app_server = server
        server.link.gone = self.stop  # the engine's process is gone: nothing left to serve

    def handle_exit(self, sig, frame) -> None:  # uvicorn's signal handler
        if not self.should_exit:
            self.app_server.shutting_down()
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        self.should_exit = True


def front(conn: Connection, settings: Settings, sock: socket.socket) -> None:
    """The HTTP process: its tokenizer, then uvicorn on `sock` (`listen`'s, opened by the engine's process) until
    told to stop (a signal, from the engine's process or the terminal) or until the engine's process is gone.
    Says ("listening", None, None) or ("failed", None, why) first."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn takes them while it runs; the engine's process says when to stop
        signal.signal(sig, lambda sig, frame: None)
    try:
        tokenizer = load_tokenizer(settings.folder) if settings.folder else None
    except MoeLocalError as e:
        conn.send(("failed", None, str(e)))
        return
    conn.send(("listening", None, None))
    server = Server(settings, tokenizer, EngineLink(conn))
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=5)
    try:
        Uvicorn(config, server).run(sockets=[sock])
    finally:
        sock.close()


class EngineSide:
    """The engine's process's end of the pipe and its Batcher: a thread reads the pipe and hands requests to the
    Batcher (and answers questions); the outputs of each of the Batcher's steps go back in one message."""

    def __init__(self, engine: Engine, parallel: int, conn: Connection):
        from moe_local.batch import Batcher  # torch: in the engine's process only

        self.batcher, self.conn = Batcher(engine, parallel, polled=self._flush), conn
        self.lock = threading.Lock()  # two threads send: the Batcher's (outputs) and the reader (answers)
        self.requests: dict[int, Request] = {}  # submitted and not answered yet
        self.outputs: list[tuple[int, Output]] = []  # emitted in the Batcher's current poll
        self.thread = threading.Thread(target=self._read, name="moe-local pipe", daemon=True)

    def _send(self, kind: str, key: int | None, value) -> None:
        with self.lock:
            try:
                self.conn.send((kind, key, value))
            except OSError:  # the HTTP process is gone: the reader finds it so too
                pass

    def _emit(self, key: int, output: Output) -> None:  # on the Batcher's thread
        if output.finish_reason or output.error:
            self.requests.pop(key, None)
        self.outputs.append((key, output))

    def _flush(self) -> None:  # on the Batcher's thread, after each poll: a step's outputs in one message
        if self.outputs:
            self._send("outputs", None, self.outputs)
            self.outputs = []

    def _read(self) -> None:
        from moe_local.batch import Request

        b = self.batcher
        while True:
            try:
                kind, key, value = self.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "submit":
                self.requests[key] = Request(**value, emit=lambda output, key=key: self._emit(key, output))
                b.submit(self.requests[key])
            elif kind == "cancel" and key in self.requests:
                self.requests.pop(key).cancelled = True
            elif kind == "counts":
                self._send("counts", key, {"running": len(b.running), "waiting": len(b.waiting), "cancelled": b.cancelled})
            elif kind == "stop":
                b.stop_soon()
        b.stop_soon()


def address(sock: socket.socket) -> str:
    """http://HOST:PORT of a listening socket, with the port it got (`--port 0` takes any free one)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve(engine: Engine, settings: Settings, sock: socket.socket, say: Callable[[str], None],
          announce: Callable[[str], None]) -> None:
    """Serve on `sock` (from `listen`) until Ctrl-C or SIGTERM; then stop taking requests, end the running ones
    with an error and return. The engine stays in this process (its Batcher on a thread); the HTTP side is
    started in its own (spawned: this one holds the model, CUDA and threads, which a fork would not carry over),
    which gets the socket. `announce` gets the line that says where it serves (said even with -q: with
    `--port 0` it is the only way to learn the port), `say` the others."""
    url, spawn = address(sock), multiprocessing.get_context("spawn")
    here, there = spawn.Pipe()
    side = EngineSide(engine, settings.parallel, here)
    http = spawn.Process(target=front, args=(there, settings, sock), name="moe-local http", daemon=True)
    stopped: list[int] = []

    def stop(sig, frame) -> None:
        stopped.append(sig)
        side.batcher.stop_soon()  # the running requests end with an error, so that their streams close
        if http.is_alive():
            os.kill(http.pid, signal.SIGTERM)  # its uvicorn stops taking requests and waits for them

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        there.close()
        sock.close()  # the HTTP process has its own copy
        try:
            kind, _, value = here.recv()
        except EOFError:
            kind, value = "failed", "the HTTP process ended while starting"
        if kind == "failed" and not stopped:
            http.join()
            raise MoeLocalError(value)
        if not stopped:
            side.batcher.prepare_grammars()
            announce(f"serving {settings.model_id} on {url}/v1 (--parallel {settings.parallel}, {settings.queue} more may wait)")
            side.thread.start()
            side.batcher.start()
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        side.batcher.stop()  # what is left ends with an error; the engine gets its sequences back
        here.close()
    if not stopped:
        raise MoeLocalError(f"the HTTP process ended unexpectedly (exit code {http.exitcode})")
    say(f"stopped ({signal.Signals(stopped[0]).name})")

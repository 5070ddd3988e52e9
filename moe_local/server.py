"""`moe-local serve`: an OpenAI-compatible HTTP API (chat completions, completions, models, health) on
Starlette and uvicorn. Handlers check a request, hand it to the `Batcher`, which owns the engine on its
own thread, and stream its outputs back through an asyncio queue; they never touch the engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import signal
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moe_local.batch import Batcher, Output, Request
from moe_local.engine import Engine
from moe_local.errors import MoeLocalError
from moe_local.harmony import is_harmony
from moe_local.generate import max_new_tokens_default

MAX_BODY_BYTES = 4 * 2**20  # a request larger than this is refused (413): a full 128k-token prompt is ~0.5 MB
ROLES = ("system", "user", "assistant")
# Sampling fields a request may set: OpenAI's, and llama.cpp's extensions; SamplingParams checks the ranges
SAMPLING = {"temperature": (int, float), "top_p": (int, float), "seed": (int,), "top_k": (int,), "min_p": (int, float),
            "repeat_penalty": (int, float)}
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "echo", "suffix")
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
        out.append({"role": m["role"], "content": text_content(m.get("content"), f"messages[{i}]")})
    return out


def chat_chunk(text: str | None, finish_reason: str | None, reasoning: str = "") -> dict:
    delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
    if reasoning:  # a harmony model's reasoning, under the name vLLM and DeepSeek's API give it
        delta["reasoning_content"] = reasoning
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chat_message(text: str, finish_reason: str, reasoning: str = "") -> dict:
    message = {"role": "assistant", "content": text} | ({"reasoning_content": reasoning} if reasoning else {})
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}


def completion_choice(text: str | None, finish_reason: str | None, reasoning: str = "") -> dict:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def usage(last: Output) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Job:
    """A request handed to the batcher, and the asyncio queue its outputs arrive on from the engine's thread."""

    def __init__(self, request_fields: dict):
        self.loop = asyncio.get_running_loop()
        self.outputs: asyncio.Queue[Output] = asyncio.Queue()
        self.request = Request(**request_fields, emit=self._emit)

    def _emit(self, output: Output) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, output)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def __aiter__(self) -> AsyncIterator[Output]:
        """The outputs; those that arrived while the last one was being sent come as one (fewer events
        to send when many requests share the event loop)."""
        while True:
            output = await self.outputs.get()
            while not (output.finish_reason or output.error) and not self.outputs.empty():
                later = self.outputs.get_nowait()
                output = replace(later, text=output.text + later.text, reasoning=output.reasoning + later.reasoning)
            yield output
            if output.finish_reason or output.error:
                return


class Server:
    """The routes' state: the engine's batcher, the limits, the API key."""

    def __init__(self, engine: Engine, model_id: str, parallel: int = 4, queue: int = 16, api_key: str | None = None):
        if queue < 0:
            raise MoeLocalError(f"--queue must be 0 or more, not {queue}")
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.batcher = Batcher(engine, parallel)
        self.capacity = parallel + queue  # requests running or waiting; past it, 503
        self.created = int(time.time())
        self.max_tokens_default = max_new_tokens_default(engine.generation_config, None)

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            self.loop = asyncio.get_running_loop()
            self.batcher.start()
            yield
            await asyncio.to_thread(self.batcher.stop)

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {ApiError: lambda request, e: e.response(),
                    HTTPException: lambda request, e: ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response(),
                    Exception: lambda request, e: ApiError(500, f"unexpected {type(e).__name__}: {e}", "server_error").response()}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)

    async def health(self, request: HttpRequest) -> Response:
        b = self.batcher
        return JSONResponse({"status": "ok", "model": self.model_id, "running": len(b.running), "waiting": len(b.waiting),
                             "cancelled": b.cancelled})

    async def models(self, request: HttpRequest) -> Response:
        self.check_key(request)
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "moe-local"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: HttpRequest) -> Response:
        self.check_key(request)
        body = await read_body(request)
        messages = chat_messages(body)
        tokenizer = self.engine.tokenizer
        effort = field(body, "reasoning_effort", (str,), "low, medium or high")
        try:
            options = tokenizer.template_options(None, effort) if effort is not None else {}
        except MoeLocalError as e:  # not a level, or a template without the switch
            raise ApiError(400, str(e), param="reasoning_effort") from None
        try:
            prompt = tokenizer.render_chat(messages, **options)
        except MoeLocalError as e:  # the template refuses this conversation (roles out of order, ...)
            raise ApiError(400, str(e), param="messages") from None
        channels = is_harmony(tokenizer)  # gpt-oss: the final channel is the answer, the others reasoning_content
        return await self.answer(request, body, prompt, "chat.completion", chat_chunk, chat_message, channels)

    async def completions(self, request: HttpRequest) -> Response:
        self.check_key(request)
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.engine.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            ids = prompt  # token ids
            if not all(0 <= i < self.engine.cfg.vocab_size for i in ids):
                raise ApiError(400, f"'prompt' has token ids outside the vocabulary (0..{self.engine.cfg.vocab_size - 1})", param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string, a list of one string or a list of token ids", param="prompt")
        return await self.answer(request, body, ids, "text_completion", completion_choice, completion_choice)

    def shutting_down(self) -> None:
        """Ctrl-C or SIGTERM: end the running requests now (streams get an error event), so that uvicorn's
        graceful shutdown finds no connection left to wait for. Called in a signal handler."""
        self.loop.call_soon_threadsafe(self.batcher.stop_soon)

    def check_key(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")

    def generation(self, body: dict, prompt: list[int]) -> dict:
        """The Request fields that `body` asks for, checked."""
        for name in UNSUPPORTED:
            if body.get(name):
                raise ApiError(400, f"'{name}' is not supported by moe-local", param=name)
        for name in ("n", "best_of"):
            if body.get(name) not in (None, 1):
                raise ApiError(400, f"'{name}' must be 1: moe-local answers one choice per request", param=name)
        given = {name: field(body, name, kinds, "a number" if float in kinds else "an integer") for name, kinds in SAMPLING.items()}
        try:
            params = replace(self.engine.sampling_defaults(), **{k: v for k, v in given.items() if v is not None})
        except ValueError as e:
            raise ApiError(400, str(e)) from None
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
        if len(prompt) > self.engine.ctx_size:
            raise ApiError(400, f"the prompt takes {len(prompt)} tokens and the context holds {self.engine.ctx_size} "
                           "(the server's --ctx-size)", param="messages", code="context_length_exceeded")
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return dict(prompt=prompt, max_tokens=max_tokens or self.max_tokens_default, params=params, stop=stop, **penalties)

    async def answer(self, request: HttpRequest, body: dict, prompt: list[int], kind: str,
                     chunk: Callable[..., dict], whole: Callable[..., dict], channels: bool = False) -> Response:
        stream = field(body, "stream", (bool,), "true or false")
        options = field(body, "stream_options", (dict,), "an object") or {}
        include_usage = field(options, "include_usage", (bool,), "true or false")
        fields = self.generation(body, prompt)
        if self.batcher.stopping:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if self.batcher.load >= self.capacity:
            raise ApiError(503, f"the server is busy: {self.batcher.load} requests are running or waiting; retry later",
                           "server_error", code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        job = Job({**fields, "channels": channels})
        self.batcher.submit(job.request)
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{secrets.token_hex(12)}",
                "created": int(time.time()), "model": self.model_id}
        if stream:
            return StreamingResponse(self.stream(job, head, kind, chunk, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            outputs = [o async for o in job]
        finally:
            watcher.cancel()
            job.request.cancelled = True  # if it is still running (the client left), the batcher drops it
        last = outputs[-1]
        if last.error:
            raise ApiError(503 if self.batcher.stopping else 500, last.error, "server_error")
        text, reasoning = "".join(o.text for o in outputs), "".join(o.reasoning for o in outputs)
        return JSONResponse({**head, "object": kind, "choices": [whole(text, last.finish_reason, reasoning)], "usage": usage(last)})

    async def stream(self, job: Job, head: dict, kind: str, chunk: Callable, include_usage: bool | None) -> AsyncIterator[str]:
        """Server-sent events; the last chunk (with finish_reason) has the usage too, and with
        stream_options.include_usage one more chunk has only the usage, as OpenAI sends it."""
        head = {**head, "object": f"{kind}.chunk" if kind == "chat.completion" else kind}
        try:
            if kind == "chat.completion":
                yield sse({**head, "choices": [chunk(None, None)]})  # the role comes first
            async for output in job:
                if output.error:
                    if output.text:
                        yield sse({**head, "choices": [chunk(output.text, None)]})
                    yield sse({"error": {"message": output.error, "type": "server_error", "param": None, "code": None}})
                    return
                if output.finish_reason is None:
                    yield sse({**head, "choices": [chunk(output.text, None, output.reasoning)]})
                    continue
                yield sse({**head, "choices": [chunk(output.text, output.finish_reason, output.reasoning)], "usage": usage(output)})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(output)})
            yield sse("[DONE]")
        finally:  # also when the client went away (Starlette cancels this generator)
            job.request.cancelled = True  # if it is still running, the batcher drops it at its next step


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


async def cancel_on_disconnect(request: HttpRequest, job: Job) -> None:
    """Once the body is read, the next ASGI message is the client leaving."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.request.cancelled = True


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise MoeLocalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.app_server = server

    def handle_exit(self, sig, frame) -> None:  # uvicorn's signal handler
        if not self.should_exit:
            self.app_server.shutting_down()
        super().handle_exit(sig, frame)


def serve(server: Server, host: str, port: int, say: Callable[[str], None]) -> None:
    """Serve until Ctrl-C or SIGTERM; then stop taking requests, end the running ones with an error and
    return."""
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=5)
    say(f"serving {server.model_id} on http://{host}:{bound}/v1 (--parallel {server.batcher.parallel}, "
        f"{server.capacity - server.batcher.parallel} more may wait)")
    # uvicorn shuts down gracefully on these, then raises the signal again: let that be the end, not an error
    stopped: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: stopped.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Uvicorn(config, server).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    say("stopped" + (f" ({signal.Signals(stopped[0]).name})" if stopped else ""))

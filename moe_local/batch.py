"""Continuous batching: `Batcher` owns the engine on one thread and runs its step loop. A request's prompt
is prefilled alone, one chunk per step, into a `Sequence` of its own (the free one whose KV cache holds
the longest prefix of it that `Engine.reusable` can keep); then it joins the decode batch, where all sequences feed their next token in
one forward pass; it leaves when it ends or is cancelled. Requests join and leave between steps."""

from __future__ import annotations

import queue
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_local.engine import Engine, Sequence
from moe_local.errors import MoeLocalError
from moe_local.generate import StopStrings, sample
from moe_local.grammar import Constraint, Grammars, allowed_rows, vocabulary
from moe_local.harmony import ChannelStream
from moe_local.params import Output, SamplingParams
from moe_local.tokenizer import StreamDecoder


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int | None  # None: until the end of text or a full context
    params: SamplingParams
    emit: Callable[[Output], None]  # called on the engine's thread
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated ...
    frequency_penalty: float = 0.0  # ... and this once per time it was generated
    cancelled: bool = False  # set by the requester (a client went away); the loop drops it at the next step
    channels: bool = False  # the answer is harmony's final channel (gpt-oss chat); the rest is reasoning
    marks: tuple[int, ...] = ()  # prompt lengths where a recurrent state is kept on the way (`Engine.prefill`)
    special: bool = False  # the text has the special tokens written (a tool-call parser reads them)
    grammar: str | None = None  # llguidance's Lark: only what it allows is generated (structured output, forced calls)
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits of these ids before sampling
    logprobs: int | None = None  # the model's logprob of each token, and of this many likeliest others


class Running:
    """A request and its sequence: its prefill progress, sampler and detokenizer."""

    def __init__(self, request: Request, seq: Sequence, engine: Engine, constraint: Constraint | None = None):
        self.request, self.seq, self.constraint = request, seq, constraint
        self.evaluated = 0  # prompt tokens prefill evaluated; the others came from the sequence's KV cache
        self.history = list(request.prompt)  # what the repeat penalty looks at, as in generate()
        self.counts: dict[int, int] = {}  # generated token -> times, for the OpenAI penalties
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.reasoning: list[str] = []  # reasoning text not handed on yet
        decoder = ChannelStream(engine.tokenizer, self.reasoning.append) if request.channels else StreamDecoder(engine.tokenizer, request.special)
        self.decoder, self.stops = decoder, StopStrings(request.stop)
        self.token: int | None = None  # sampled, not yet fed to the model: the next decode step's input
        self.logprobs: list[tuple] = []  # (token, logprob, [(id, logprob), ...]) not handed on yet
        self._logprobs = None  # [V]: the last step's log-softmax of the model's logits

    @property
    def prefilled(self) -> bool:
        return self.token is not None

    @property
    def greedy(self) -> bool:
        """Whether its next token is only the likeliest one its grammar allows: greedy, no penalty, bias or logprobs."""
        r, p = self.request, self.request.params
        return (p.temperature == 0 and (p.repeat_penalty == 1.0 or p.repeat_last_n == 0) and not r.presence_penalty
                and not r.frequency_penalty and not r.logit_bias and r.logprobs is None)

    def sample(self, logits: torch.Tensor, allowed: torch.Tensor | None) -> int:
        """The next token from this step's logits [V]; `allowed` [V] bool: what the grammar allows (None: no grammar)."""
        r = self.request
        if r.logprobs is not None:  # the model's own distribution: before penalties, bias, grammar and temperature
            self._logprobs = torch.log_softmax(logits.float().cpu(), -1)
        if self.counts and (r.presence_penalty or r.frequency_penalty):
            ids = torch.tensor(list(self.counts))
            counts = torch.tensor(list(self.counts.values()), dtype=torch.float32)
            logits = logits.clone()
            logits[ids] -= r.presence_penalty + r.frequency_penalty * counts
        if r.logit_bias:
            logits = logits.clone()
            logits[torch.tensor(list(r.logit_bias))] += torch.tensor(list(r.logit_bias.values()), dtype=logits.dtype)
        return sample(logits, self.history, r.params, self.generator, allowed)

    def note(self, token: int) -> None:
        """Keeps the token's logprobs to hand on; moves the grammar on."""
        if self._logprobs is not None:
            top = torch.topk(self._logprobs, self.request.logprobs) if self.request.logprobs else None
            others = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            self.logprobs.append((token, float(self._logprobs[token]), others))
        if self.constraint is not None:
            self.constraint.accept(token)

    def take_logprobs(self) -> list[tuple]:
        taken, self.logprobs = self.logprobs, []
        return taken

    def take_reasoning(self) -> str:
        text, self.reasoning[:] = "".join(self.reasoning), []
        return text

    def output(self, **fields) -> Output:
        return Output(**fields, logprobs=self.take_logprobs(), prompt_tokens=len(self.request.prompt), cached_tokens=len(self.request.prompt) - self.evaluated,
                      completion_tokens=len(self.history) - len(self.request.prompt))


class Batcher:
    """The engine's only user while it runs: `submit` hands it a request from any thread."""

    def __init__(self, engine: Engine, parallel: int, polled: Callable[[], None] = lambda: None):
        if parallel < 1:
            raise MoeLocalError(f"--parallel must be at least 1, not {parallel}")
        self.engine, self.parallel = engine, parallel
        self.polled = polled  # called after each poll, its outputs emitted (the server sends them on together)
        # idle sequences, least recently used first; their caches are kept for the next request's prefix
        self.free: list[Sequence] = [engine.sequence] + [engine.new_sequence() for _ in range(parallel - 1)]
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.waiting: deque[Request] = deque()
        self.running: list[Running] = []
        self.cancelled = 0  # requests dropped unfinished because their requester went away
        self.grammars: Grammars | None = None  # compiled against llguidance's view of the vocabulary, for requests with a grammar
        self._building: threading.Thread | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="moe-local engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        self.inbox.put(request)

    @property
    def load(self) -> int:
        """Requests submitted and not yet answered (read from another thread: a moment's count)."""
        return self.inbox.qsize() + len(self.waiting) + len(self.running)

    def stop_soon(self) -> None:
        """Answer what is still queued or running with an error and end the loop, at its next step."""
        self.stopping = True
        self.inbox.put(None)

    def stop(self) -> None:
        """End the loop (answering what is left with an error) and give the engine its sequences back."""
        self.stop_soon()
        if self.thread.is_alive():
            self.thread.join()
        else:
            self.poll()  # the loop never ran on its thread: end what is left here
        for seq in self.free:
            self.engine.release_sequence(seq)
        self.free = []

    def _loop(self) -> None:
        while self.poll(block=True):
            pass

    def poll(self, block: bool = False) -> bool:
        """Take what was submitted (waiting for it when there is nothing to do and `block`), then one step.
        False once `stop` was called."""
        idle = not self.waiting and not self.running
        try:
            try:
                item = self.inbox.get(block=block and idle)
                while True:
                    if item is None:
                        self._end_all("the server is shutting down")
                        return False
                    self.waiting.append(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            self.step()
            return True
        finally:
            self.polled()

    def step(self) -> None:
        """Admit waiting requests to free sequences, feed one prefill chunk, then one decode step for
        every request already prefilled."""
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            self.cancelled += 1
        for r in [r for r in self.running if r.request.cancelled]:
            self._leave(r)
            self.cancelled += 1
        while self.waiting and self.free:
            self._admit(self.waiting.popleft())
        filling = next((r for r in self.running if not r.prefilled), None)
        if filling is not None:
            self._guard([filling], lambda: self._prefill_chunk(filling))
        ready = [r for r in self.running if r.prefilled and r is not filling]
        if ready:
            self._guard(ready, lambda: self._decode(ready))

    def _admit(self, request: Request) -> None:
        try:
            constraint = self._constraint(request.grammar) if request.grammar is not None else None
        except MoeLocalError as e:
            return request.emit(Output(error=str(e)))
                # the sequence that already holds most of this prompt (or a snapshot of it), else the least recently used
        best = max(range(len(self.free)), key=lambda i: (self.engine.reusable(request.prompt, self.free[i]), -i))
        self.running.append(Running(request, self.free.pop(best), self.engine, constraint))

    def prepare_grammars(self) -> None:
        """Builds the vocabulary grammars need on a thread of its own (~7 s for Qwen3's 152k tokens on a busy 2-core
        machine), so that the first request with one does not hold up the batch for it; the server calls it at start."""
        if self._building is None and self.engine.has_tokenizer:
            self._building = threading.Thread(target=self._build_vocabulary, name="moe-local grammar vocabulary", daemon=True)
            self._building.start()

    def _build_vocabulary(self) -> None:
        self.grammars = Grammars(vocabulary(self.engine.tokenizer, self.engine.cfg.vocab_size, sorted(self.engine.stop_ids)))

    def _constraint(self, grammar: str) -> Constraint:
        if self._building is not None:
            self._building.join()
        if self.grammars is None:
            self._build_vocabulary()
        return self.grammars.constraint(grammar)

    def _prefill_chunk(self, r: Running) -> None:
        prompt = r.request.prompt
        end = min(len(prompt), self.engine.reusable(prompt, r.seq) + self.engine.options.prefill_chunk)
        logits, evaluated = self.engine.prefill(prompt[:end], r.seq, r.request.marks)  # only what the cache lacks
        r.evaluated += evaluated
        if end == len(prompt):
            self._accept(r, r.sample(logits, r.constraint.allowed() if r.constraint is not None else None))

    def _decode(self, ready: list[Running]) -> None:
        logits = self.engine.decode_batch([r.seq for r in ready], [r.token for r in ready])  # [B, V]
        constraints = [r.constraint for r in ready]
        allowed = allowed_rows(constraints, logits.shape[1]) if any(c is not None for c in constraints) else None  # [B, V] bool
        chosen = self._greedy([i for i, r in enumerate(ready) if r.greedy], logits, allowed)
        for i, (r, row) in enumerate(zip(ready, logits)):
            row_allowed = allowed[i] if r.constraint is not None else None
            token = chosen.get(i)
            self._guard([r], lambda: self._accept(r, token if token is not None else r.sample(row, row_allowed)))  # noqa: B023: called at once

    @staticmethod
    def _greedy(rows: list[int], logits: torch.Tensor, allowed: torch.Tensor | None) -> dict[int, int]:
        """The tokens of `rows` (plain greedy ones: `Running.greedy`) as `sample` would choose them, found for all of them
        at once: the likeliest token each grammar allows. Rows whose logits are not all finite are left out (`sample`
        says what is wrong with them)."""
        if not rows:
            return {}
        taken = logits if len(rows) == logits.shape[0] else logits[rows]  # [n, V]
        finite = torch.isfinite(taken).all(dim=1).tolist()
        if allowed is not None:
            taken = taken.masked_fill(~allowed[rows], float("-inf"))
        return {i: token for i, token, ok in zip(rows, taken.argmax(dim=1).tolist(), finite) if ok}

    def _accept(self, r: Running, token: int) -> None:
        """Hand on a sampled token, as `generate` would: the end of text is not shown; a stop string, max_tokens
        or a full context ends the request."""
        request, generated = r.request, len(r.history) - len(r.request.prompt)
        if token in self.engine.stop_ids:
            return self._finish(r, "stop", "")
        r.history.append(token)
        r.counts[token] = r.counts.get(token, 0) + 1
        r.note(token)
        text = r.stops.push(r.decoder.push(token))
        if r.stops.stopped or (r.constraint is not None and r.constraint.done):  # the grammar takes only an end of text now
            return self._finish(r, "stop", text)
        if generated + 1 == request.max_tokens or len(r.history) > self.engine.ctx_size:  # no position left to feed it at
            return self._finish(r, "length", text)
        r.token = token
        reasoning = r.take_reasoning()
        if text or reasoning:
            request.emit(Output(text, reasoning, logprobs=r.take_logprobs()))

    def _finish(self, r: Running, reason: str, text: str) -> None:
        if not r.stops.stopped:  # what the detokenizer and the stop strings still hold back
            text += r.stops.push(r.decoder.flush())
            if r.stops.stopped:  # the held-back end completed a stop string: the text ends there, as stopped
                reason = "stop"
            text += r.stops.flush()
        r.request.emit(r.output(text=text, reasoning=r.take_reasoning(), finish_reason=reason, stop_sequence=r.stops.stopped))
        self._leave(r)

    def _leave(self, r: Running) -> None:
        self.running.remove(r)
        self.free.append(r.seq)

    def _guard(self, group: list[Running], work: Callable[[], None]) -> None:
        """A failure in a step ends the requests in it, with the error, and the server goes on."""
        try:
            work()
        except Exception as e:  # noqa: BLE001: whatever it was, these requests cannot go on
            message = str(e) if isinstance(e, MoeLocalError) else f"unexpected {type(e).__name__}: {e}"
            for r in group:
                if r in self.running:
                    r.seq.tokens = []  # what its KV cache holds is not known any more
                    r.request.emit(r.output(error=message))
                    self._leave(r)

    def _end_all(self, message: str) -> None:
        for request in self.waiting:
            request.emit(Output(error=message))
        for r in list(self.running):
            r.request.emit(r.output(error=message))
            self._leave(r)

"""Interactive chat: `ChatSession` owns a conversation (messages, system message, sampling settings, slash
commands, fitting the context) and runs without a terminal; `chat_loop` is the terminal around it."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

from moe_local.engine import Engine
from moe_local.errors import MoeLocalError
from moe_local.generate import GenerationStats, SamplingParams
from moe_local.tokenizer import StreamDecoder

# What `/set NAME VALUE` can change, and how to read VALUE.
SETTINGS = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repeat_penalty": float,
    "seed": int,
    "max_new_tokens": int,
}
ALIASES = {"temp": "temperature"}  # as the --temp flag

HELP = f"""\
Available commands:
  /set NAME VALUE      set {', '.join(SETTINGS)} (e.g. /set temperature 0.3)
  /set system TEXT     set the system message (empty: none)
  /clear               forget the conversation
  /stats               KV cache, speed and expert cache counters of the last answer
  /bye                 exit (Ctrl-D too)
  /?, /help            this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer and keeps what it said."""


class ChatSession:
    """One conversation with a loaded model. Each prompt repeats the earlier turns, and `Engine.prefill`
    evaluates only what the KV cache does not already hold."""

    def __init__(self, engine: Engine, params: SamplingParams, max_new_tokens: int | None = None, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.max_new_tokens = max_new_tokens  # per answer; None: until the end of text or a full context
        self.messages: list[dict] = []  # user, assistant, user, assistant, ...
        self.prompt: list[int] = []  # the last prompt's ids
        self._prompt_text = ""
        self._said: tuple[str, list[int], str] | None = None  # last prompt's text, its ids + the answer's, the answer
        self.stats = GenerationStats()  # the last answer's

    def render(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The prompt for `messages`, as text and as ids."""
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        text = self.engine.tokenizer.render_chat_text(chat)
        return text, self.continue_said(text) or self.engine.tokenizer.render_chat(chat)

    def continue_said(self, text: str) -> list[int] | None:
        """When `text` is the last prompt, the last answer, then the EOS token and more (as Mixtral's and most
        templates close an answer): the ids of the last prompt and of the answer as it was generated, then the
        ids of the rest. Tokenizing the rendered answer anew could give other ids (Mixtral's template puts a
        space before it that the model may not have written) and the KV cache would be recomputed from there;
        a special token splits tokenization, so the rest has the same ids alone as within the whole text."""
        eos = self.engine.tokenizer.eos_token
        if self._said is None or not eos:
            return None
        said_text, said_ids, answer = self._said
        start = text.find(answer, len(said_text))
        rest = text[start + len(answer) :]
        if not text.startswith(said_text) or start < 0 or text[len(said_text) : start].strip() or not rest.startswith(eos):
            return None
        return said_ids + self.engine.tokenizer.encode(rest, bos=False)

    def check_template(self) -> None:
        """Fail now, not at the first message, when the chat template rejects this conversation's shape."""
        self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}])

    def ask(self, text: str) -> int:
        """Add the user's message and build `self.prompt`; returns how many of the oldest turns were dropped
        so that the prompt leaves room for an answer of min(max new tokens, a quarter of the context)."""
        ctx = self.engine.ctx_size
        room = min(ctx if self.max_new_tokens is None else self.max_new_tokens, ctx // 4)
        messages = [*self.messages, {"role": "user", "content": text}]
        (prompt_text, prompt), dropped = self.render(messages), 0
        while len(prompt) + room > ctx and len(messages) > 1:
            messages, dropped = messages[2:], dropped + 1
            prompt_text, prompt = self.render(messages)
        if len(prompt) >= ctx:
            raise MoeLocalError(
                f"this message takes {len(prompt)} tokens with the chat template and the context holds {ctx}: "
                "shorten it or raise --ctx-size"
            )
        self.messages, self.prompt, self._prompt_text = messages, prompt, prompt_text
        return dropped

    def reply(self, stopped: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """Generate the answer to the message `ask` added, streamed as token ids; `stopped()` is checked
        between tokens. The answer joins the history, also a partial one; a turn with no answer is forgotten."""
        self.stats = GenerationStats()
        limit = self.engine.ctx_size if self.max_new_tokens is None else self.max_new_tokens
        tokens: list[int] = []
        try:
            for token in self.engine.generate(self.prompt, limit, self.params, self.stats):
                tokens.append(token)
                yield token
                if stopped():
                    self.stats.finish_reason = "interrupted"
                    break
        finally:
            self.stats.experts = self.engine.experts.stats.as_dict()
            if tokens:
                answer = self.engine.tokenizer.decode(tokens)
                self.messages.append({"role": "assistant", "content": answer})
                self._said = (self._prompt_text, self.prompt + tokens, answer)
            else:
                self.messages.pop()  # keeps the roles alternating

    @property
    def context_full(self) -> bool:
        """The last answer stopped because no position was left in the context."""
        return self.stats.finish_reason == "length" and self.stats.prompt_tokens + self.stats.generated_tokens > self.engine.ctx_size

    def command(self, line: str) -> str | None:
        """Run a slash command: the text to show, or None for /bye. A bad command raises MoeLocalError."""
        name, _, rest = line.strip().partition(" ")
        if name in ("/?", "/help"):
            return HELP
        if name == "/bye":
            return None
        if name == "/clear":
            self.messages, self._said = [], None
            return "Cleared the conversation."
        if name == "/stats":
            return self.stats_text()
        if name == "/set":
            return self.set(rest.strip())
        raise MoeLocalError(f"unknown command {name} (/? for help)")

    def set(self, args: str) -> str:
        key, _, value = args.partition(" ")
        value = value.strip()
        if key == "system":
            previous, self.system = self.system, value or None
            try:
                self.check_template()
            except MoeLocalError:
                self.system = previous
                raise
            return f"Set the system message to {value!r}." if value else "Removed the system message."
        name = ALIASES.get(key, key.replace("-", "_"))
        if name not in SETTINGS:
            raise MoeLocalError(f"/set needs one of {', '.join(SETTINGS)} or system, then a value (got {key!r})")
        kind = SETTINGS[name]
        try:
            number = kind(value)
        except ValueError:
            raise MoeLocalError(f"{name} takes {'a whole number' if kind is int else 'a number'}, not {value!r}") from None
        if name == "max_new_tokens":
            if number < 1:
                raise MoeLocalError("max_new_tokens must be >= 1")
            self.max_new_tokens = number
        else:
            try:
                self.params = replace(self.params, **{name: number})
            except ValueError as e:  # SamplingParams says which range
                raise MoeLocalError(str(e)) from None
        return f"Set {name} to {number}."

    def stats_text(self) -> str:
        engine, s = self.engine, self.stats
        turns = len(self.messages) // 2
        lines = [f"conversation  {turns} turn{'s' * (turns != 1)}; the KV cache holds {len(engine.tokens)} of {engine.ctx_size} tokens"]
        if not s.prompt_tokens:
            return "\n".join(lines + ["no answer yet"])
        ended = {"stop": "the end of text", "interrupted": "Ctrl-C"}.get(s.finish_reason)
        ended = ended or ("a full context" if self.context_full else "max_new_tokens")
        recall = s.experts.get("prefetch_recall")
        lines += [
            f"last prompt   {s.prompt_tokens} tokens: {s.prompt_tokens - s.prompt_tokens_evaluated} reused from the KV cache, "
            f"{s.prompt_tokens_evaluated} evaluated ({s.prompt_tok_per_s:.1f} tokens/s)",
            f"last answer   {s.generated_tokens} tokens ({s.decode_tok_per_s:.1f} tokens/s), ended by {ended}",
            f"expert cache  {100 * s.experts.get('hit_rate', 0):.1f} % hits, prefetch recall "
            + (f"{100 * recall:.1f} %" if recall is not None else "n/a")
            + f", {s.experts.get('bytes_copied', 0) / 1e9:.3f} GB copied; "
            f"{engine.plan.expert_slots} of {engine.plan.total_experts} experts fit in slots on {engine.device.type}",
        ]
        return "\n".join(lines)


def read_message() -> str:
    """One line, or the lines between \"\"\" and \"\"\" (as Ollama reads them)."""
    line = input(">>> ")
    if not line.startswith('"""'):
        return line
    lines = [line[3:]]
    while not lines[-1].endswith('"""'):
        lines.append(input("... "))
    return "\n".join(lines)[:-3]


@contextmanager
def ctrl_c_stops() -> Iterator[Callable[[], bool]]:
    """While answering, Ctrl-C sets a flag that the token loop checks between tokens: a KeyboardInterrupt
    in the middle of a forward pass would leave the expert cache's slot bookkeeping half-done."""
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def answer(session: ChatSession, text: str) -> None:
    dropped = session.ask(text)
    if dropped:
        turns = f"{dropped} oldest turns" if dropped > 1 else "oldest turn"
        say(f"(dropped the {turns} to fit the context of {session.engine.ctx_size} tokens)")
    decoder = StreamDecoder(session.engine.tokenizer)
    with ctrl_c_stops() as stopped:
        for token in session.reply(stopped):
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n\n")
    sys.stdout.flush()
    if session.context_full:
        say(f"(the context of {session.engine.ctx_size} tokens is full: the oldest turns will make room for the next one)")


def chat_loop(session: ChatSession) -> None:
    """Read messages and commands until /bye or Ctrl-D."""
    import readline  # noqa: F401  (arrow keys and input history for input(); imported here: it changes input())

    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.")
            continue
        except EOFError:
            print()
            return
        try:
            if text.startswith("/") and "\n" not in text:
                shown = session.command(text)
                if shown is None:
                    return
                print(shown)
            elif text.strip():
                answer(session, text)
        except MoeLocalError as e:
            say(f"error: {e}")
        except KeyboardInterrupt:  # in the moments around an answer when Ctrl-C is not caught as a flag
            print()

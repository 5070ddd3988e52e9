"""Interactive chat: `ChatSession` owns a conversation (messages, system message, sampling settings, slash
commands, saving and loading, fitting the context) and runs without a terminal; `chat_loop` is the terminal
around it."""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from moe_local.budget import format_bytes
from moe_local.engine import Engine, read_json
from moe_local.errors import MoeLocalError
from moe_local.paths import cache_root
from moe_local.generate import GenerationStats, SamplingParams
from moe_local.harmony import ChannelStream, is_harmony, split_channels
from moe_local.tokenizer import StreamDecoder, replace_surrogates

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
SWITCHES = {"on": True, "off": False}
# The shortest conversation a template must accept for a chat: checked before the first message (and by
# the CLI before the slow load), so that a template that rejects it fails at once.
TEMPLATE_PROBE = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"})
NO_CHANNELS = "--show-reasoning applies to models that answer in channels (gpt-oss's harmony format); this model's answers are plain text"


def chats_dir() -> Path:
    """Where /save NAME and /load NAME keep conversations: beside the quantized-experts cache."""
    return cache_root() / "chats"


HELP = f"""\
Available commands:
  /set NAME VALUE      set {', '.join(SETTINGS)} (e.g. /set temperature 0.3)
  /set system TEXT     set the system message (empty: none)
  /set think on|off    let the model think before it answers, or not (templates with enable_thinking: Qwen3, GLM-4.5)
  /set preserve-thinking on|off  keep the reasoning of every earlier answer in the prompt, or only after the last question (Qwen3.6's preserve_thinking)
  /set reasoning LEVEL how long the model reasons before it answers: low, medium or high (templates with reasoning_effort: gpt-oss)
  /set verbose on|off  show each answer's speed
  /save NAME           save the conversation: NAME is a file path, or a name for {{chats}}/NAME.json
  /load NAME           continue a saved conversation
  /show info           the model: architecture, parameters, context, experts
  /clear               forget the conversation
  /stats               KV cache, speed and expert cache counters of the last answer
  /bye                 exit (Ctrl-D too)
  /?, /help            this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer and keeps what it said."""


class ChatSession:
    """One conversation with a loaded model. Each prompt repeats the earlier turns, and `Engine.prefill`
    evaluates only what the KV cache does not already hold."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        max_new_tokens: int | None = None,
        system: str | None = None,
        think: bool | None = None,
        verbose: bool = False,
        reasoning_effort: str | None = None,
        show_reasoning: bool = False,
        preserve_thinking: bool | None = None,
    ):
        self.engine, self.params, self.system = engine, params, system and replace_surrogates(system)  # /save writes UTF-8
        self.max_new_tokens = max_new_tokens  # per answer; None: until the end of text or a full context
        self.think = think  # the template's enable_thinking; None: the template's default
        self.reasoning_effort = reasoning_effort  # the template's reasoning_effort (gpt-oss); None: its default
        self.preserve_thinking = preserve_thinking  # the template's preserve_thinking (Qwen3.6); None: its default
        engine.tokenizer.template_options(think, reasoning_effort, preserve_thinking)  # refuses a template without the switch
        # harmony models (gpt-oss) answer in channels: the final one is the answer, the analysis its reasoning
        self.channels = is_harmony(engine.tokenizer)
        if show_reasoning and not self.channels:
            raise MoeLocalError(NO_CHANNELS)
        self.show_reasoning = show_reasoning  # chat_loop shows the reasoning dimmed, else says once that it hides it
        self.verbose = verbose  # chat_loop shows each answer's speed
        self.messages: list[dict] = []  # user, assistant, user, assistant, ...
        self.prompt: list[int] = []  # the last prompt's ids
        self.marks: tuple[int, ...] = ()  # where in it the conversation before the answer ends (`closed`)
        self._prompt_text = ""
        self._said: tuple[str, list[int], str] | None = None  # last prompt's text, its ids + the answer's, the answer
        self.stats = GenerationStats()  # the last answer's

    def render(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The prompt for `messages`, as text and as ids."""
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        options = self.engine.tokenizer.template_options(self.think, self.reasoning_effort, self.preserve_thinking)
        text = self.engine.tokenizer.render_chat_text(chat, **options)
        return text, self.continue_said(text) or self.engine.tokenizer.render_chat(chat, **options)

    def closed(self, messages: list[dict], prompt: list[int]) -> tuple[int, ...]:
        """Where in `prompt` (the ids of `messages` and the template's generation prompt) the conversation
        alone ends, if it ends there: the next turn's prompt repeats it, and a model with linear-attention layers
        resumes there (`Engine.prefill`'s marks) where its template renders the answer otherwise than it was
        generated (Qwen3.5's drops the thinking block and the generation prompt's empty one). Nothing for a
        model whose cache can be cut back to any prefix, or where the template refuses to end there."""
        if self.engine.kv.can_truncate:
            return ()
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        options = self.engine.tokenizer.template_options(self.think, self.reasoning_effort, self.preserve_thinking)
        try:
            ids = self.engine.tokenizer.render_chat(chat, add_generation_prompt=False, **options)
        except MoeLocalError:  # a template that only renders a conversation with its generation prompt
            return ()
        return (len(ids),) if 0 < len(ids) < len(prompt) and prompt[: len(ids)] == ids else ()

    def continue_said(self, text: str) -> list[int] | None:
        """When `text` is the last prompt, the last answer, then an added token (EOS as Mixtral's template closes
        an answer, <|im_end|> in ChatML, <|user|> in GLM's) and more: the ids of the last prompt and of the answer
        as it was generated, then the ids of the rest. Tokenizing the rendered answer anew could give other ids
        (Mixtral's template puts a space before it that the model may not have written) and the KV cache would
        be recomputed from there; an added token splits tokenization, so the rest has the same ids alone as
        within the whole text."""
        if self._said is None:
            return None
        said_text, said_ids, answer = self._said
        start = text.find(answer, len(said_text))
        rest = text[start + len(answer) :]
        if not text.startswith(said_text) or start < 0 or text[len(said_text) : start].strip():
            return None
        if not any(rest.startswith(token) for token in self.engine.tokenizer.added_tokens):
            return None
        return said_ids + self.engine.tokenizer.encode(rest, bos=False)

    def check_template(self) -> None:
        """Fail now, not at the first message, when the chat template rejects this conversation's shape."""
        self.render(list(TEMPLATE_PROBE))

    def ask(self, text: str) -> int:
        """Add the user's message and build `self.prompt`; returns how many of the oldest turns were dropped
        so that the prompt leaves room for an answer of min(max new tokens, a quarter of the context)."""
        ctx = self.engine.ctx_size
        room = min(ctx if self.max_new_tokens is None else self.max_new_tokens, ctx // 4)
        messages = [*self.messages, {"role": "user", "content": replace_surrogates(text)}]  # /save writes UTF-8
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
        self.marks = self.closed(messages, prompt)
        return dropped

    def reply(self, stopped: Callable[[], bool] = lambda: False) -> Iterator[int]:
        """Generate the answer to the message `ask` added, streamed as token ids; `stopped()` is checked
        between tokens. The answer joins the history, also a partial one; a turn with no answer is forgotten."""
        self.stats = GenerationStats()
        limit = self.engine.ctx_size if self.max_new_tokens is None else self.max_new_tokens
        tokens: list[int] = []
        try:
            for token in self.engine.generate(self.prompt, limit, self.params, self.stats, self.marks):
                tokens.append(token)
                yield token
                if stopped():
                    self.stats.finish_reason = "interrupted"
                    break
        finally:
            self.stats.experts = self.engine.experts.stats.as_dict()
            if tokens and self.channels:
                # the template renders an earlier answer as its final text alone (the reasoning it drops, as it
                # says), never as the ids generated: the KV cache is reused up to where they differ
                answer, reasoning = split_channels(self.engine.tokenizer, tokens)
                self.messages.append({"role": "assistant", "content": answer, **({"thinking": reasoning} if reasoning else {})})
                self._said = None
            elif tokens:
                answer = self.engine.tokenizer.decode(tokens)
                self.messages.append({"role": "assistant", "content": answer})
                self._said = (self._prompt_text, self.prompt + tokens, answer)
            else:
                self.messages.pop()  # keeps the roles alternating

    @property
    def context_full(self) -> bool:
        """The last answer stopped because no position was left in the context."""
        return self.stats.finish_reason == "context"

    def command(self, line: str) -> str | None:
        """Run a slash command: the text to show, or None for /bye. A bad command raises MoeLocalError."""
        name, _, rest = line.strip().partition(" ")
        if name in ("/?", "/help"):
            return HELP.replace("{chats}", str(chats_dir()))
        if name == "/bye":
            return None
        if name == "/clear":
            self.messages, self._said = [], None
            return "Cleared the conversation."
        if name == "/stats":
            return self.stats_text()
        if name == "/set":
            return self.set(rest.strip())
        if name == "/save":
            return self.save(self.chat_path(rest.strip()))
        if name == "/load":
            return self.load(self.chat_path(rest.strip()))
        if name == "/show":
            if rest.strip() != "info":
                raise MoeLocalError("/show takes info (/show info)")
            return self.info_text()
        raise MoeLocalError(f"unknown command {name} (/? for help)")

    def set(self, args: str) -> str:
        key, _, value = args.partition(" ")
        value = replace_surrogates(value.strip())
        if key == "reasoning":
            self.engine.tokenizer.reasoning_option(value)  # refuses a template without it, or another value
            self.reasoning_effort = value
            return f"Set the reasoning effort to {value}."
        if key == "system":
            previous, self.system = self.system, value or None
            try:
                self.check_template()
            except MoeLocalError:
                self.system = previous
                raise
            return f"Set the system message to {value!r}." if value else "Removed the system message."
        if key in ("think", "preserve-thinking", "verbose"):
            if value not in SWITCHES:
                raise MoeLocalError(f"/set {key} takes on or off, not {value!r}")
            if key == "think":
                self.engine.tokenizer.thinking_option(SWITCHES[value])
                self.think = SWITCHES[value]
            elif key == "preserve-thinking":
                self.engine.tokenizer.preserve_option(SWITCHES[value])
                self.preserve_thinking = SWITCHES[value]
            else:
                self.verbose = SWITCHES[value]
            return f"Set {key} {value}."
        name = ALIASES.get(key, key.replace("-", "_"))
        if name not in SETTINGS:
            raise MoeLocalError(f"/set needs one of {', '.join(SETTINGS)}, system, think, preserve-thinking, reasoning or verbose, then a value (got {key!r})")
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

    @staticmethod
    def chat_path(name: str) -> Path:
        """NAME as /save and /load read it: a plain name is chats_dir()/NAME.json, anything with a / or a .json
        suffix is a path."""
        if not name:
            raise MoeLocalError("give a NAME or a file path (/save NAME, /load NAME)")
        if "/" in name or name.startswith("~") or name.endswith(".json"):
            return Path(name).expanduser()
        return chats_dir() / f"{name}.json"

    def save(self, path: Path) -> str:
        data = {"format": "moe-local chat", "version": 1, "model": str(self.engine.folder or ""), "system": self.system, "messages": self.messages}
        if path.parent == chats_dir():
            path.parent.mkdir(parents=True, exist_ok=True)  # /save NAME's own folder, made on first use
        elif not path.parent.is_dir():  # a path's folder is the user's: a typo in it must not become new folders
            raise MoeLocalError(f"cannot save to {path}: the folder {path.parent} does not exist (create it first, "
                                f"or /save NAME to keep it in {chats_dir()})")
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise MoeLocalError(f"cannot save to {path}: {e.strerror or e}") from None
        turns = len(self.messages) // 2
        return f"Saved {turns} turn{'s' * (turns != 1)} to {path}."

    def load(self, path: Path) -> str:
        """Replace the conversation (and the system message) by a saved one; the next turn renders it anew."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MoeLocalError(f"no saved conversation at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MoeLocalError(f"cannot read {path}: {e}") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        system = data.get("system") if isinstance(data, dict) else None
        roles = ["user", "assistant"] * (len(messages) // 2) if isinstance(messages, list) else None
        if (
            roles is None or len(messages) % 2
            or not all(isinstance(m, dict) and m.get("role") == role and isinstance(m.get("content"), str)
                       and isinstance(m.get("thinking", ""), str) for m, role in zip(messages, roles))
            or not isinstance(system, (str, type(None)))
        ):
            raise MoeLocalError(f"{path} is not a saved conversation: expected messages that alternate user/assistant, each with a text content")
        previous = self.messages, self.system
        kept = ("role", "content", "thinking")  # thinking: a harmony answer's reasoning, which its template may read
        self.messages, self.system = [{key: m[key] for key in kept if key in m} for m in messages], system
        try:
            self.render([*self.messages, {"role": "user", "content": "Hi"}])  # the template accepts it
        except MoeLocalError:
            self.messages, self.system = previous
            raise
        self._said = None
        turns = len(messages) // 2
        return f"Loaded {turns} turn{'s' * (turns != 1)} from {path}."

    def info_text(self) -> str:
        """The model, as `moe-local info` describes it, and how this session runs it."""
        engine, cfg = self.engine, self.engine.cfg
        architecture = cfg.model_type
        if engine.folder is not None:
            architecture = f"{(read_json(engine.folder / 'config.json').get('architectures') or [cfg.model_type])[0]} ({cfg.model_type})"
        counts = cfg.parameter_counts()
        fmt = engine.store.format
        lines = [
            f"model         {engine.folder or '(built in memory)'}",
            f"architecture  {architecture}",
            f"parameters    {_count(counts['total'])} total, {_count(counts['active_per_token'])} active per token "
            f"({cfg.top_k} of {cfg.n_experts} experts in each of {cfg.n_moe_layers} MoE layers; "
            f"{_count(counts['active_without_embeddings'])} without the token embedding table)",
            f"context       {engine.ctx_size} tokens (--ctx-size; the model's: {cfg.max_position_embeddings}), the KV cache holds {len(engine.tokens)}",
            f"experts       {fmt.key}, {format_bytes(fmt.expert_bytes)} each; "
            + (f"all {engine.plan.total_experts} run in place from host RAM" if engine.plan.in_place
               else f"{engine.plan.expert_slots} of {engine.plan.total_experts} in slots on {engine.device.type}")
            + f"; compute in {str(engine.dtype).removeprefix('torch.')}",
        ]
        return "\n".join(lines)

    def speed_text(self) -> str:
        """The last answer's speed, as `ollama run --verbose` shows it."""
        s = self.stats
        return "\n".join([
            f"prompt eval   {s.prompt_tokens_evaluated} tokens in {s.prompt_seconds:.2f} s ({s.prompt_tok_per_s:.1f} tokens/s), "
            f"{s.prompt_tokens - s.prompt_tokens_evaluated} more from the KV cache",
            f"generation    {s.generated_tokens} tokens in {s.decode_seconds:.2f} s ({s.decode_tok_per_s:.1f} tokens/s)",
        ])

    def stats_text(self) -> str:
        engine, s = self.engine, self.stats
        turns = len(self.messages) // 2
        lines = [f"conversation  {turns} turn{'s' * (turns != 1)}; the KV cache holds {len(engine.tokens)} of {engine.ctx_size} tokens"]
        if not s.prompt_tokens:
            return "\n".join(lines + ["no answer yet"])
        ended = {"stop": "the end of text", "interrupted": "Ctrl-C"}.get(s.finish_reason)
        ended = ended or ("a full context" if self.context_full else "max_new_tokens")
        recall = s.experts.get("prefetch_recall")
        if engine.plan.in_place:  # no slots: nothing to hit, miss or copy
            experts = f"expert cache  none: all {engine.plan.total_experts} experts run in place from host RAM, 0 bytes copied"
        else:
            experts = (f"expert cache  {100 * (s.experts.get('hit_rate') or 0):.1f} % hits, prefetch recall "
                       + (f"{100 * recall:.1f} %" if recall is not None else "n/a")
                       + f", {s.experts.get('bytes_copied', 0) / 1e9:.3f} GB copied; "
                       f"{engine.plan.expert_slots} of {engine.plan.total_experts} experts fit in slots on {engine.device.type}")
        lines += [
            f"last prompt   {s.prompt_tokens} tokens: {s.prompt_tokens - s.prompt_tokens_evaluated} reused from the KV cache, "
            f"{s.prompt_tokens_evaluated} evaluated ({s.prompt_tok_per_s:.1f} tokens/s)",
            f"last answer   {s.generated_tokens} tokens ({s.decode_tok_per_s:.1f} tokens/s), ended by {ended}",
            experts,
        ]
        return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def read_message() -> str:
    """One line, or the lines between \"\"\" and \"\"\" (as Ollama reads them). A message of several lines is one
    entry of readline's history, as it was typed (up-arrow brings back all of it, not its last line)."""
    line = input(">>> ")
    if not line.startswith('"""'):
        return line
    readline = sys.modules.get("readline")  # chat_loop's, which makes input() add every line it reads to the history
    lines = [line[3:]]
    several = readline is not None and not lines[-1].endswith('"""')
    if several:
        readline.set_auto_history(False)
    try:
        while not lines[-1].endswith('"""'):
            lines.append(input("... "))
    finally:
        if several:
            readline.set_auto_history(True)
    if several:
        last = readline.get_current_history_length()
        if last and readline.get_history_item(last) == line:  # the first line, which input() added alone
            readline.remove_history_item(last - 1)
        readline.add_history('"""' + "\n".join(lines))
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


class ReasoningPrinter:
    """Where a harmony answer's reasoning goes as it streams (`ChannelStream`'s on_reasoning): dimmed on stderr with
    --show-reasoning, else nowhere, with one line on stderr the first time that says so (none when quiet)."""

    def __init__(self, show: bool, quiet: bool = False):
        self.show, self.quiet, self.told = show, quiet, False
        self._console = None

    def __call__(self, text: str) -> None:
        if self.show:
            if self._console is None:
                from rich.console import Console

                self._console = Console(stderr=True)
            self._console.print(text, style="dim", end="", markup=False, highlight=False, soft_wrap=True)
        elif not self.told and not self.quiet:
            self.told = True
            say("reasoning hidden; --show-reasoning shows it")


def answer(session: ChatSession, text: str, on_reasoning: Callable[[str], None] | None = None) -> None:
    dropped = session.ask(text)
    if dropped:
        turns = f"{dropped} oldest turns" if dropped > 1 else "oldest turn"
        say(f"(dropped the {turns} to fit the context of {session.engine.ctx_size} tokens)")
    if session.channels:  # the answer on stdout, the reasoning to on_reasoning
        decoder = ChannelStream(session.engine.tokenizer, on_reasoning or ReasoningPrinter(session.show_reasoning))
    else:
        decoder = StreamDecoder(session.engine.tokenizer)
    with ctrl_c_stops() as stopped:
        for token in session.reply(stopped):
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n\n")
    sys.stdout.flush()
    if session.verbose:
        say(session.speed_text() + "\n")
    if session.context_full:
        say(f"(the context of {session.engine.ctx_size} tokens is full: the oldest turns will make room for the next one)")


def chat_loop(session: ChatSession, quiet: bool = False) -> None:
    """Read messages and commands until /bye or Ctrl-D; quiet: no note that the reasoning is hidden."""
    import readline  # noqa: F401  (arrow keys and input history for input(); imported here: it changes input())

    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, not an error that ends the chat
        sys.stdin.reconfigure(errors="replace")
    on_reasoning = ReasoningPrinter(session.show_reasoning, quiet)  # says once per chat that it hides the reasoning
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
                answer(session, text, on_reasoning)
        except MoeLocalError as e:
            say(f"error: {e}")
        except KeyboardInterrupt:  # in the moments around an answer when Ctrl-C is not caught as a flag
            print()

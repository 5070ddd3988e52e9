"""Text to token ids and back for a model folder, chat templates, and streaming decode.

Reads tokenizer.json (via `tokenizers`: sentencepiece-style or byte-level BPE) or tokenizer.model (via
`sentencepiece`), plus tokenizer_config.json and chat_template.jinja. Templates render as transformers'
`apply_chat_template` renders them.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import re

import jinja2
import jinja2.meta
import jinja2.sandbox
import sentencepiece
import tokenizers

from moe_local.errors import TokenizerError

# Mixtral-8x7B-Instruct's prompt format, used when the model folder has no template:
#   <s>[INST] {user} [/INST] {assistant}</s>[INST] {user} [/INST]
# As Mistral does, a system message becomes the head of the first user message.
# "-}}" drops the newline after each output line: trim_blocks only does that for {% %}.
# A model with no EOS token (eos_token undefined, as transformers leaves it) renders without one.
MIXTRAL_CHAT_TEMPLATE = """\
{% if messages and messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}
{% set messages = messages[1:] %}
{% endif %}
{{ bos_token -}}
{% for message in messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('after an optional system message, roles must alternate user/assistant/user/...') -}}
{% endif %}
{% if message['role'] == 'user' %}
{% if loop.first and system is defined %}
{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' -}}
{% else %}
{{ '[INST] ' + message['content'] + ' [/INST]' -}}
{% endif %}
{% elif message['role'] == 'assistant' %}
{{ ' ' + message['content'] }}{{ eos_token -}}
{% else %}
{{ raise_exception('unsupported role ' + message['role'] + ': only system, user and assistant') -}}
{% endif %}
{% endfor %}
"""


class _TemplateRaised(Exception):
    """What a template's raise_exception() throws; its message is already for a person."""


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # As transformers: Jinja's own tojson escapes <, >, & and ' for HTML and knows no ensure_ascii,
    # and tool schemas rendered into a prompt must read as plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)  # templates that write today's date (Llama 3, gpt-oss)


# Immutable sandbox: templates come from downloaded model folders and must not reach
# Python internals or mutate our messages. The rest is what transformers' environment
# offers (chat_template_utils.py): loop controls ({% break %}), raise_exception,
# strftime_now and its tojson.
_JINJA = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
)
_JINJA.globals["raise_exception"] = _raise_exception
_JINJA.globals["strftime_now"] = _strftime_now
_JINJA.filters["tojson"] = _tojson

REASONING_EFFORTS = ("low", "medium", "high")  # gpt-oss's reasoning_effort


def check_reasoning_effort(effort: str) -> None:
    """Refuse a reasoning effort that is none of REASONING_EFFORTS, whatever the model."""
    if effort not in REASONING_EFFORTS:
        raise TokenizerError(f"the reasoning effort is {', '.join(REASONING_EFFORTS[:-1])} or {REASONING_EFFORTS[-1]}, not {effort!r}")

_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """`text` with each lone surrogate as U+FFFD. Python keeps bytes that are not UTF-8 (in argv, and in
    stdin under the C locale) as such code points, which no tokenizer library can take."""
    return _SURROGATE.sub("\ufffd", text)


class _TokenizersBackend:
    """tokenizer.json: the file itself says how to split special tokens and add the dummy prefix."""

    def __init__(self, path: pathlib.Path | tokenizers.Tokenizer):
        if isinstance(path, tokenizers.Tokenizer):  # built from a GGUF's vocabulary
            self._tok = path
        else:
            try:
                self._tok = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the library raises a bare Exception for bad JSON
                raise TokenizerError(f"cannot read {path}: {e}") from e
        self.size = self._tok.get_vocab_size(with_added_tokens=True)
        self.default_tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        self.added = {token.content: i for i, token in self._tok.get_added_tokens_decoder().items()}

    def piece_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def use_added_tokens(self, added: dict[str, int]) -> None:
        pass  # tokenizer.json lists its own added tokens

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], special: bool = False) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.size], skip_special_tokens=not special)


class _SentencePieceBackend:
    """tokenizer.model: sentencepiece never matches special-token strings, so we split on them first."""

    def __init__(self, path: pathlib.Path):
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise TokenizerError(f"cannot read {path}: not a valid sentencepiece model ({e})") from e
        self.size = self._sp.get_piece_size()
        self.default_tokens = {
            key: self._sp.id_to_piece(i) if i >= 0 else None
            for key, i in (
                ("bos_token", self._sp.bos_id()),
                ("eos_token", self._sp.eos_id()),
                ("unk_token", self._sp.unk_id()),
            )
        }
        self.added: dict[str, int] = {}
        self._split = None

    def piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers the unk id for a piece it does not know.
        return i if self._sp.id_to_piece(i) == piece else None

    def use_added_tokens(self, added: dict[str, int]) -> None:
        self.added = dict(added)
        if added:
            # Longest first, so "<s>" cannot claim the start of a longer token.
            alternatives = sorted(added, key=len, reverse=True)
            self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._sp.encode(text)
        ids = []
        # Each stretch between special tokens gets its own dummy prefix, as in Mistral's
        # reference code (which encodes every [INST] block separately) and in Mixtral's
        # tokenizer.json (whose normalizer prepends one to every such stretch).
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.added[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids: list[int], special: bool = False) -> str:
        # A model's embedding table may be padded past the tokenizer's vocabulary: such
        # ids have no text, and dropping them beats crashing in the middle of a reply.
        ids = [i for i in ids if 0 <= i < self.size]
        if not special:
            return self._sp.decode(ids)
        # sentencepiece drops control pieces ([TOOL_CALLS], </s>) from its text: each one's piece is written in its place
        parts, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self._sp.decode(run)])


def _read_config(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise TokenizerError(f"cannot read {path}: expected a JSON object")
    return config


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a token either as its text or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(config: dict, folder: pathlib.Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: only "default" is for plain chat
        defaults = [t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"]
        template = defaults[0] if defaults else None
    path = folder / "chat_template.jinja"
    if template is None and path.is_file():
        # Newer transformers save the template beside the config instead of inside it.
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {path}: {e}") from e
    return template if isinstance(template, str) else None


def load_tokenizer(folder: pathlib.Path) -> Tokenizer:
    """The tokenizer of a model folder (tokenizer.json is preferred over tokenizer.model) or of a GGUF model
    (its `tokenizer.ggml.*` metadata and `tokenizer.chat_template`)."""
    folder = pathlib.Path(folder)
    if folder.suffix == ".gguf" or not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        # only then: the gguf package is not needed for a safetensors folder (neither module imports torch)
        from moe_local.weights import gguf, gguf_vocab

        files = gguf.find_gguf(folder)
        if files:
            tokenizer, config, template = gguf_vocab.build(gguf_vocab.read_vocab_metadata(files[0]))
            return Tokenizer(_TokenizersBackend(tokenizer), config, template)
    config = _read_config(folder / "tokenizer_config.json")
    if (folder / "tokenizer.json").is_file():
        backend = _TokenizersBackend(folder / "tokenizer.json")
    elif (folder / "tokenizer.model").is_file():
        backend = _SentencePieceBackend(folder / "tokenizer.model")
    else:
        raise TokenizerError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model")
    return Tokenizer(backend, config, _chat_template(config, folder))


class Tokenizer:
    """Encodes and decodes text for one model, and renders its chat template."""

    def __init__(self, backend, config: dict, chat_template: str | None = None):
        self._backend = backend
        self.chat_template = chat_template
        self.add_bos = bool(config.get("add_bos_token", True))

        added, hidden = {}, set()
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            if not str(key).isdigit():
                raise TokenizerError(f"tokenizer_config.json: added token id {key!r} is not a number")
            text = _token_text(entry)
            if text is not None:
                added[text] = int(key)
                if not isinstance(entry, dict) or entry.get("special", True):
                    hidden.add(int(key))

        def special(key: str) -> tuple[str | None, int | None]:
            # A key set to null means "none", which differs from a missing key.
            text = _token_text(config[key]) if key in config else backend.default_tokens[key]
            if text is None:
                return None, None
            token_id = added.get(text, backend.piece_id(text))
            return (text, token_id) if token_id is not None else (None, None)

        self.bos_token, self.bos_id = special("bos_token")
        self.eos_token, self.eos_id = special("eos_token")
        unk_token, unk_id = special("unk_token")
        # What a template sees as bos_token, eos_token, ... (transformers passes the ones that are set).
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": unk_token, "pad_token": _token_text(config.get("pad_token"))}
        self.special_tokens = {key: text for key, text in named.items() if text is not None}
        # Always matched as whole tokens in text and never printed, like added special tokens.
        specials = [(self.bos_token, self.bos_id), (self.eos_token, self.eos_id), (unk_token, unk_id)]
        for text, token_id in specials:
            if text is not None:
                added[text] = token_id
                hidden.add(token_id)
        backend.use_added_tokens(added)
        self._hidden = hidden
        self.vocab_size = max([backend.size, *(i + 1 for i in added.values())])
        # Text that always becomes one id, whatever surrounds it: tokenization never crosses it.
        self.added_tokens = frozenset(backend.added)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids for `text`; special-token strings in it (such as "</s>") become their ids. Lone
        surrogates (undecodable bytes kept by Python) are encoded as U+FFFD."""
        ids = self._backend.encode(replace_surrogates(text))
        if bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], special: bool = False) -> str:
        """The text of `ids`, leaving out special tokens such as BOS and EOS; with `special`, writing them (what a
        tool-call parser reads: GLM-4.5's <arg_key>, DeepSeek's <｜tool▁call▁begin｜>, harmony's headers)."""
        return self._backend.decode(ids if special else [i for i in ids if i not in self._hidden], special)

    @property
    def template_source(self) -> str:
        return self.chat_template if self.chat_template is not None else MIXTRAL_CHAT_TEMPLATE

    def template_reads(self, name: str) -> bool:
        """Whether the chat template reads the variable `name` (such as Qwen3's enable_thinking)."""
        try:
            return name in jinja2.meta.find_undeclared_variables(_JINJA.parse(self.template_source))
        except jinja2.TemplateSyntaxError:
            return False  # rendering says what is wrong

    def thinking_option(self, think: bool | None) -> dict:
        """The template variables for --think/--no-think: enable_thinking (Qwen3, GLM-4.5), or none at all for
        the template's default (think=None)."""
        if think is None:
            return {}
        if not self.template_reads("enable_thinking"):
            raise TokenizerError("this model's chat template has no thinking switch (enable_thinking), so --think/--no-think and /set think do not apply")
        return {"enable_thinking": think}

    def reasoning_option(self, effort: str | None) -> dict:
        """The template variable for --reasoning-effort: reasoning_effort (gpt-oss), or none at all for the template's
        default (effort=None)."""
        if effort is None:
            return {}
        check_reasoning_effort(effort)
        if not self.template_reads("reasoning_effort"):
            raise TokenizerError("this model's chat template has no reasoning effort (reasoning_effort), so --reasoning-effort and /set reasoning do not apply")
        return {"reasoning_effort": effort}

    def preserve_option(self, preserve: bool | None) -> dict:
        """The template variable for --preserve-thinking: preserve_thinking (Qwen3.6: the reasoning of every earlier
        answer stays in the prompt, not only of those after the last question), or none at all for the template's
        default (preserve=None)."""
        if preserve is None:
            return {}
        if not self.template_reads("preserve_thinking"):
            raise TokenizerError("this model's chat template has no preserve_thinking switch (Qwen3.6's), so --preserve-thinking "
                                 "and /set preserve-thinking do not apply")
        return {"preserve_thinking": preserve}

    def template_options(self, think: bool | None = None, reasoning_effort: str | None = None, preserve_thinking: bool | None = None) -> dict:
        """The template variables of --think/--no-think, --reasoning-effort and --preserve-thinking; refuses a template
        without them."""
        return {**self.thinking_option(think), **self.reasoning_option(reasoning_effort), **self.preserve_option(preserve_thinking)}

    @property
    def hidden_tokens(self) -> frozenset[str]:
        """The text of each token `decode` leaves out (BOS, EOS, GLM-4.5's <think>, ...)."""
        return frozenset(text for text, i in self._backend.added.items() if i in self._hidden)

    def token_id(self, text: str) -> int | None:
        """The id of an added token such as gpt-oss's <|channel|>, or None when the tokenizer has no such token."""
        return self._backend.added.get(text)

    def render_chat_text(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                         **options) -> str:
        """The chat template (the model's, else Mixtral's) filled in with `messages` and `tools` (OpenAI's function
        definitions); `options` are passed to it as variables (enable_thinking=False for Qwen3 and GLM-4.5), as
        transformers' apply_chat_template does."""
        # As transformers: keys set to None are dropped (templates test `is defined`), tools and documents are
        # None, and the options override the special tokens.
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        variables = {**self.special_tokens, **options}
        try:
            return _JINJA.from_string(self.template_source).render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except _TemplateRaised as e:
            problem = str(e)
        except jinja2.TemplateSyntaxError as e:
            problem = f"syntax error on line {e.lineno}: {e.message}"
        except Exception as e:  # a template is foreign code: any failure is the template's
            problem = f"{type(e).__name__}: {e}"
        raise TokenizerError(f"chat template failed: {problem}")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    **options) -> list[int]:
        """Token ids of the rendered chat, with BOS exactly once when the template writes it."""
        text = self.render_chat_text(messages, add_generation_prompt, tools, **options)
        if self.bos_token and text.startswith(self.bos_token):
            return [self.bos_id, *self.encode(text[len(self.bos_token) :], bos=False)]
        return self.encode(text, bos=False)


class StreamDecoder:
    """Turns generated ids, one at a time, into text to print as soon as it is complete.

    Decoding a token alone loses the space sentencepiece keeps in its "▁" prefix and can
    split a UTF-8 character, so each step decodes a short window of recent ids and emits
    what the newest id added to it. The pieces joined equal decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tokenizer, self._special = tokenizer, special  # special: special tokens are written, see Tokenizer.decode
        self._ids: list[int] = []
        self._start = 0  # window start: ids before it are printed and never decoded again
        self._printed = 0  # ids[:_printed] have all their text printed

    def push(self, token_id: int) -> str:
        """Text completed by `token_id`; empty while it is held back."""
        self._ids.append(token_id)
        done = self._tokenizer.decode(self._ids[self._start : self._printed], self._special)
        text = self._tokenizer.decode(self._ids[self._start :], self._special)
        # U+FFFD at the end is a character whose remaining bytes are still to come.
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._start, self._printed = self._printed, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        done = self._tokenizer.decode(self._ids[self._start : self._printed], self._special)
        text = self._tokenizer.decode(self._ids[self._start :], self._special)
        self._start = self._printed = len(self._ids)
        return text[len(done) :]

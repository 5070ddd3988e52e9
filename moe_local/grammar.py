"""Constrained decoding with llguidance: a request's grammar (a JSON schema, any JSON object, or a tool call in the
model's own format, written as llguidance's Lark) compiled against the model's vocabulary (`Grammars`, which keeps
the recently compiled ones); `Constraint.allowed` is what the grammar allows next, `accept` moves it on by the
token sampled. Built in the engine's process (the Batcher applies each running request's mask in its step); the HTTP
process only writes and checks grammars (`json_grammar`, `check`), which needs llguidance but not torch."""

from __future__ import annotations

import json
from collections import OrderedDict

import llguidance

from moe_local.errors import MoeLocalError
from moe_local.harmony import CHANNEL, MESSAGE, is_harmony


class GrammarError(MoeLocalError):
    """A schema or grammar llguidance cannot take."""


# JSON as json.dumps and the chat templates' tojson write it ("a": 1, "b": 2), no other whitespace: else a model
# may spend its tokens on newlines between the braces
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_lark(schema: dict | None) -> str:
    """Lark's %json of `schema` (None: any JSON object), laid out as JSON_LAYOUT."""
    schema = schema if schema is not None else {"type": "object"}
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_LAYOUT, **(schema.get("x-guidance") or {})}}, ensure_ascii=False)


def json_grammar(schema: dict | None) -> str:
    """The grammar of a JSON value that validates against `schema` (None: any JSON object)."""
    return "start: " + json_lark(schema)


def answer_grammar(tokenizer, schema: dict | None) -> str:
    """The grammar of an answer that is JSON validating against `schema` (None: any JSON object); a harmony model
    (gpt-oss) writes it as its final channel's message, its reasoning skipped."""
    grammar = json_grammar(schema)
    if is_harmony(tokenizer):
        grammar = grammar.replace("start: ", f'start: <[{tokenizer.token_id(CHANNEL)}]> "final" <[{tokenizer.token_id(MESSAGE)}]> ', 1)
    check(grammar)
    return grammar


def check(grammar: str) -> None:
    """Raises GrammarError with llguidance's words when it cannot take `grammar` (special tokens, which only the
    vocabulary knows, are checked when the engine compiles it)."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(llguidance.grammar_from("lark", grammar))
    if failed:
        raise GrammarError(f"the grammar cannot be used: {messages[0].strip()}")


def token_bytes(tokenizer) -> tuple[list[bytes], list[int]]:
    """Every id's bytes, as llguidance reads a vocabulary (special tokens as 0xFF + their text), and the special ids."""
    backend = tokenizer._backend
    if hasattr(backend, "_sp"):  # sentencepiece: "▁" is a space, <0x0A> one byte, control pieces special
        sp, out, special = backend._sp, [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                out.append(bytes([int(piece[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i):
                out.append(b"\xff" + piece.encode())
                special.append(i)
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out, special
    tok = backend._tok
    n = tok.get_vocab_size(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()
    byte_level = _byte_decoder()
    out, special = [], []
    for i in range(n):
        if i in added and added[i].special:
            out.append(b"\xff" + added[i].content.encode())
            special.append(i)
        elif i in added:
            out.append(added[i].content.encode())
        else:
            piece = tok.id_to_token(i) or ""
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # sentencepiece-style byte fallback
                out.append(bytes([int(piece[3:5], 16)]))
            elif all(c in byte_level for c in piece) and "\u2581" not in piece:
                out.append(bytes(byte_level[c] for c in piece))
            else:
                out.append(piece.replace("\u2581", " ").encode())
    return out, special


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as, reversed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class _Wrapper:
    """What llguidance.TokenizerWrapper reads: the tokens' bytes, and an encoder of text (greedy longest match over
    those bytes: exact, where the model's own encoder may add sentencepiece's dummy prefix)."""

    def __init__(self, tokens: list[bytes], special: list[int], eos: int, bos: int | None):
        self.tokens, self.special_token_ids, self.eos_token_id, self.bos_token_id = tokens, special, eos, bos
        skip = set(special)
        self._ids = {t: i for i, t in enumerate(tokens) if t and i not in skip}
        self._longest = max(map(len, self._ids))

    def __call__(self, text) -> list[int]:
        data, ids, i = text if isinstance(text, bytes) else text.encode(), [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                if data[i : i + n] in self._ids:
                    ids.append(self._ids[data[i : i + n]])
                    i += n
                    break
            else:
                raise GrammarError(f"the vocabulary cannot spell byte {data[i]:#x}")
        return ids


def vocabulary(tokenizer, n_vocab: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """The model's vocabulary as llguidance reads it (~1 s for 150k tokens: built once per engine). Ids past the
    tokenizer's (a padded embedding table) are never allowed."""
    tokens, special = token_bytes(tokenizer)
    special += range(len(tokens), n_vocab)
    tokens += [b"\xff<padding>"] * (n_vocab - len(tokens))
    wrapper = _Wrapper(tokens, special, eos_ids[0], tokenizer.bos_id)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), n_vocab=n_vocab, eos_token=list(eos_ids))


class Grammars:
    """The grammars compiled against one vocabulary, the CACHED most recently used kept: a request whose grammar was
    compiled before (a client's one response_format, an agent's tools sent again with every request) starts from a
    copy of its matcher (~10 us) where compiling takes 1-7 ms, more for large schemas and tool lists. Engine side,
    on one thread (the Batcher's)."""

    CACHED = 32

    def __init__(self, vocab: llguidance.LLTokenizer):
        self.vocab = vocab
        self.compiled = 0  # grammars compiled (not taken from the cache), failed ones too
        self._matchers: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> a matcher before any token

    def constraint(self, grammar: str) -> Constraint:
        """A new request's Constraint of `grammar`; GrammarError where llguidance cannot take it."""
        matcher = self._matchers.get(grammar)
        if matcher is None:
            self.compiled += 1
            matcher = llguidance.LLMatcher(self.vocab, llguidance.grammar_from("lark", grammar), log_level=0)
            if matcher.is_error():
                raise GrammarError(f"the grammar cannot be used: {matcher.get_error()}")
            self._matchers[grammar] = matcher
            if len(self._matchers) > self.CACHED:
                self._matchers.popitem(last=False)
        self._matchers.move_to_end(grammar)
        return Constraint(matcher.deep_copy(), self.vocab.vocab_size)


class Constraint:
    """One request's grammar as it decodes (a matcher of its own, from `Grammars.constraint`): what it `allowed`
    next (or its row of a batch step's `allowed_rows`), then `accept` the token sampled. Engine side (torch)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self):
        """[V] bool: the tokens the grammar allows next."""
        return allowed_rows([self], self.vocab_size)[0]

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar does not allow token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """Whether the grammar takes no more tokens (but an end of text)."""
        return self.matcher.is_stopped()


def allowed_rows(constraints: list[Constraint | None], vocab_size: int):
    """[B, V] bool: row i what constraints[i] allows next (None: everything), the rows unpacked together (a batch
    step's)."""
    bits = _bitmask(len(constraints), vocab_size)
    for i, c in enumerate(constraints):
        if c is not None:
            c.matcher.unsafe_compute_mask_ptr(bits[i].data_ptr(), bits.shape[1] * 4)
    return _unpack(bits, vocab_size)


def _bitmask(rows: int, vocab_size: int):
    """[rows, W] int32, llguidance's bits of a mask (token i: bit i % 32 of word i // 32), all set."""
    import torch

    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def _unpack(bits, vocab_size: int):
    """[B, W] int32 bits -> [B, V] bool."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], -1)[:, :vocab_size].bool()  # [B, W, 32] -> [B, V]

"""A GGUF's tokenizer (`tokenizer.ggml.*`) as a `tokenizers.Tokenizer` plus the tokenizer_config.json-style
fields `tokenizer.Tokenizer` reads (special tokens, whether to add BOS, the chat template), built to tokenize
as llama.cpp does: the SentencePiece-style `llama` vocabulary (pieces with scores, merged best score first,
a space before each stretch of text, bytes as <0xNN> for what no piece covers) and the byte-level BPE `gpt2`
vocabulary (merges in rank order, split first by the pre-tokenizer `tokenizer.ggml.pre` names), and Gemma 4's
`gemma4` (a BPE with merges over "▁"-spaced text, byte fallback). No torch: the server's HTTP process builds it."""

from __future__ import annotations

from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from moe_local.errors import TokenizerError

# llama.cpp's token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# the pre-tokenizer's split per `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp has them; None: GPT-2's
QWEN2 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3 = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS = {"qwen2": QWEN2, "llama-bpe": LLAMA3, "llama3": LLAMA3, "default": None, "gpt-2": None, "olmo": None}


def read_vocab_metadata(path: Path) -> dict:
    """The `tokenizer.*` fields of a GGUF file (the first part of a split model holds them)."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # what is wrong with the file is reported where the model is read; here only that it is
        raise TokenizerError(f"cannot read the tokenizer from {path.name}: {e}") from None
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def build(metadata: dict) -> tuple[Tokenizer, dict, str | None]:
    """(the tokenizer, tokenizer_config.json-style fields, the chat template or None) from `tokenizer.*` fields."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("the GGUF has no vocabulary (tokenizer.ggml.tokens)")
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "llama":
        tokenizer = _sentencepiece_bpe(tokens, metadata.get("tokenizer.ggml.scores"), types, metadata.get("tokenizer.ggml.add_space_prefix", True))
        add_bos_default = True
    elif kind == "gpt2":
        tokenizer = _bytelevel_bpe(tokens, metadata.get("tokenizer.ggml.merges") or [], metadata.get("tokenizer.ggml.pre", "default"))
        add_bos_default = False
    elif kind == "gemma4":
        tokenizer = _spaced_bpe(tokens, metadata.get("tokenizer.ggml.merges") or [], types)
        add_bos_default = True
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (supported: llama, gpt2, gemma4)")
    # control tokens are special (matched in text, hidden when decoding); user-defined ones are matched, shown
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED])
    added = {str(i): {"content": tokens[i], "special": t == CONTROL} for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}

    def token(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"), "pad_token": token("padding"),
              "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)), "added_tokens_decoder": added}  # fmt: skip
    template = metadata.get("tokenizer.chat_template")
    return tokenizer, config, template if isinstance(template, str) else None


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, types: list[int], space_prefix: bool) -> Tokenizer:
    """llama.cpp's SPM tokenizer as a BPE: merging the pair whose joined piece scores best first is BPE with
    merges ranked by that score (ties: the lower ids first)."""
    if scores is None:
        raise TokenizerError("the GGUF's llama vocabulary has no scores (tokenizer.ggml.scores)")
    vocab = {piece: i for i, piece in enumerate(tokens)}
    mergeable = {piece for piece, t in zip(tokens, types) if t in (NORMAL, USER_DEFINED)}
    merges = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[vocab[piece]], vocab[left], vocab[right], left, right))
    merges.sort()
    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    byte_fallback = BYTE in types
    tokenizer = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if space_prefix else [])])  # fmt: skip
    return tokenizer


def _bytelevel_bpe(tokens: list[str], merges: list[str], pre: str) -> Tokenizer:
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre; supported: {', '.join(PRE_TOKENIZERS)})")
    vocab = {piece: i for i, piece in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, unk_token=None, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _spaced_bpe(tokens: list[str], merges: list[str], types: list[int]) -> Tokenizer:
    """Gemma 4's vocabulary: a BPE with merges over text whose spaces are written "▁", split after each space,
    bytes as <0xNN> for what no piece covers (its tokenizer.json's layout)."""
    vocab = {piece: i for i, piece in enumerate(tokens)}
    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer

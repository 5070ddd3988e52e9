"""Test fixtures built on the spot: real tokenizers trained offline on Python's own sources."""

from __future__ import annotations

import collections
import functools
import io
import json
import pathlib
import sysconfig
from collections.abc import Sequence

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

import chat_templates

# Docstring-rich stdlib modules, present in every CPython: about 330 KB of text in all.
_CORPUS_MODULES = (
    "textwrap.py",
    "string.py",
    "difflib.py",
    "argparse.py",
    "json/decoder.py",
    "json/encoder.py",
    "calendar.py",
    "ast.py",
)

# Llama/Mixtral reserve ids 0-2 for these; every other id comes from training.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_N_BYTE_PIECES = 256


@functools.cache
def corpus_text() -> str:
    """The training text. The same for a given Python version, so trained models are too."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return "".join((stdlib / name).read_text(encoding="utf-8") for name in _CORPUS_MODULES)


def _training_lines(budget: int) -> list[str]:
    """Corpus lines written only in the `budget` most frequent characters.

    Every character sentencepiece sees takes a vocabulary slot, and it cannot be told
    to drop more than 2% of them, so a small vocabulary is met by leaving out the
    lines with rare characters; those characters then go through byte fallback.
    """
    lines = [line for line in corpus_text().splitlines() if line.strip()]
    counts = collections.Counter(char for line in lines for char in line)
    # Ties broken by the character itself, so the choice never depends on dict order.
    ranked = sorted(counts, key=lambda char: (-counts[char], char))
    allowed = set(ranked[:budget])
    return [line for line in lines if allowed.issuperset(line)]


@functools.cache  # the suite asks for the same tokenizer many times
def _train_model(vocab_size: int, control_tokens: tuple[str, ...]) -> bytes:
    reserved = 3 + len(control_tokens) + _N_BYTE_PIECES
    if vocab_size < reserved + 16:
        raise ValueError(f"vocab_size {vocab_size} leaves too little room beside {reserved} reserved pieces")
    # Half of what is left for characters, half for merges: at the suite's small
    # sizes a tokenizer with no merges would not exercise BPE at all.
    lines = _training_lines((vocab_size - reserved) // 2)
    model = io.BytesIO()
    # The options mirror Llama/Mixtral's tokenizer.model (its trainer_spec):
    # BPE, byte fallback, digits split, a dummy prefix, whitespace kept as is.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        control_symbols=list(control_tokens),
        num_threads=1,  # one thread keeps the merge order reproducible
        minloglevel=2,
    )
    return model.getvalue()


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges recovered from a sentencepiece vocabulary, as transformers' converter does.

    A sentencepiece BPE model stores pieces ranked by merge order but not the merges
    themselves: every split of a piece into two known pieces is a merge, ranked by the piece.
    """
    merges = []
    for piece, rank in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        splits = [(left, right) for left, right in splits if left in vocab and right in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, rank) for left, right in splits]
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])))
    return [(left, right) for left, right, _ in merges]


def _tokenizer_json(model: bytes, special: Sequence[str]) -> str:
    """The model as a tokenizer.json in the layout Mixtral's own file on the Hub uses."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    plain = {piece: i for piece, i in vocab.items() if piece not in special}
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=_merges(plain), unk_token=UNK, fuse_unk=True, byte_fallback=True)
    )
    # A normalizer (not a Metaspace pre-tokenizer) prepends the dummy prefix to every
    # stretch of text between special tokens, even one starting with a space, as
    # sentencepiece does.
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)]
    )
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])
    return tokenizer.to_str(pretty=True)


def train_tokenizer(
    folder: pathlib.Path,
    vocab_size: int = 320,
    kind: str = "sentencepiece",
    *,
    chat_template: str | list[dict] | None = None,
    control_tokens: Sequence[str] = (),
) -> None:
    """Write a Mixtral-style tokenizer into `folder`: tokenizer.model and tokenizer_config.json.

    kind="json" also writes tokenizer.json (the same model, for the `tokenizers` library).
    control_tokens become extra special tokens with ids 3, 4, ... as Mistral's [INST] and
    [/INST] are in its later tokenizers. The same arguments always give the same bytes.
    """
    if kind not in ("sentencepiece", "json"):
        raise ValueError(f"kind must be 'sentencepiece' or 'json', not {kind!r}")
    folder.mkdir(parents=True, exist_ok=True)
    model = _train_model(vocab_size, tuple(control_tokens))
    (folder / "tokenizer.model").write_bytes(model)

    special = [UNK, BOS, EOS, *control_tokens]
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(special)
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if kind == "json":
        (folder / "tokenizer.json").write_text(_tokenizer_json(model, special) + "\n", encoding="utf-8")


# --- byte-level BPE, as Qwen2/Qwen3, GLM-4.5, DeepSeek-V3 and OLMoE ship it -------------------------------

# Qwen2/Qwen3's pre-tokenizer split; GLM-4.5 and DeepSeek-V3 keep runs of up to 3 digits together.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
DIGITS_BY_3_SPLIT = QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")
# Qwen3.5/3.6's: letters with their combining marks (transformers' Qwen3_5Tokenizer)
QWEN35_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# gpt-oss's o200k_harmony split: case-aware words with their contractions, up to 3 digits
O200K_SPLIT = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])

# What each family's checkpoints ship, as keyword arguments of `train_bytelevel_tokenizer` (keyed by
# config.json's model_type). `generation_eos` are the ids generation_config.json lists as eos_token_id.
FAMILY_TOKENIZERS = {
    "qwen3_moe": dict(
        chat_template=chat_templates.QWEN3,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        plain_tokens=("<tool_call>", "</tool_call>", "<think>", "</think>"),  # added, but "special": false
        eos_token="<|im_end|>", pad_token="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
    "qwen3_5_moe": dict(  # Qwen3.5 and Qwen3.6 (its vision tokens are special too)
        chat_template=chat_templates.QWEN36,
        template_file=True,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                        "<|video_pad|>"),
        plain_tokens=("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", tokenizer_class="Qwen3_5Tokenizer", split=QWEN35_SPLIT,
        generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
    "qwen2_moe": dict(
        chat_template=chat_templates.QWEN2,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
    "glm4_moe": dict(
        chat_template=chat_templates.GLM45,
        template_file=True,  # GLM-4.5 ships chat_template.jinja
        special_tokens=("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                        "<|assistant|>", "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                        "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"),
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", tokenizer_class="PreTrainedTokenizerFast",
        split=DIGITS_BY_3_SPLIT, generation_eos=("<|endoftext|>", "<|user|>", "<|observation|>"),
    ),
    "deepseek_v3": dict(
        chat_template=chat_templates.DEEPSEEK_V3,
        head_tokens=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),  # ids 0 and 1
        special_tokens=("<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                        "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                        "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"),
        plain_tokens=("<think>", "</think>"),
        bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
        add_bos_token=True, tokenizer_class="LlamaTokenizerFast", split=DIGITS_BY_3_SPLIT,
        generation_eos=("<｜end▁of▁sentence｜>",),
    ),
    "gpt_oss": dict(
        chat_template=chat_templates.GPT_OSS,
        template_file=True,  # gpt-oss ships chat_template.jinja
        # the harmony tokens, in the order of their ids in o200k_harmony (199998, 199999, 200002, 200003, ...)
        special_tokens=("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                        "<|end|>", "<|message|>", "<|call|>"),
        bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>",
        tokenizer_class="PreTrainedTokenizerFast", split=O200K_SPLIT,
        generation_eos=("<|return|>", "<|endoftext|>", "<|call|>"),  # not <|end|>: more messages follow it
    ),
    "olmoe": dict(
        chat_template=chat_templates.OLMOE,
        head_tokens=("<|endoftext|>", "<|padding|>"),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|padding|>",
        tokenizer_class="GPTNeoXTokenizer", split=None, generation_eos=("<|endoftext|>",),
    ),
}


@functools.cache  # the suite asks for the same tokenizer many times
def _train_bytelevel(vocab_size: int, split: str | None, head_tokens: tuple[str, ...]) -> str:
    """A byte-level BPE with `vocab_size` entries, `head_tokens` first: the tokenizer.json text."""
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # Qwen's layout: NFC, a regex split, then bytes mapped to printable characters (no prefix space).
    tokenizer.normalizer = normalizers.NFC()
    if split is None:  # GPT-2's split, built into ByteLevel (GPT-NeoX, OLMoE)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in head_tokens],
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_text().splitlines(keepends=True), trainer)
    return tokenizer.to_str()


def train_bytelevel_tokenizer(
    folder: pathlib.Path,
    chat_template: str | None = None,
    *,
    vocab_size: int = 512,
    special_tokens: Sequence[str] = (),
    plain_tokens: Sequence[str] = (),
    head_tokens: Sequence[str] = (),
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    add_bos_token: bool = False,
    tokenizer_class: str = "Qwen2Tokenizer",
    split: str | None = QWEN2_SPLIT,
    template_file: bool = False,
    generation_eos: Sequence[str] = (),
) -> dict[str, int]:
    """Write a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) into `folder`, trained on
    `corpus_text()`, in the layout of Qwen2/Qwen3, GLM-4.5, DeepSeek-V3 and OLMoE checkpoints; returns the id
    of every added token. `FAMILY_TOKENIZERS[model_type]` holds each family's arguments:

        ids = train_bytelevel_tokenizer(folder, **FAMILY_TOKENIZERS["qwen3_moe"])

    vocab_size counts every id (the BPE's and the added tokens'): a model's vocab_size must be at least that.
    head_tokens get ids 0, 1, ... (DeepSeek's BOS and EOS); special_tokens (hidden by decode) and then
    plain_tokens (added tokens with "special": false, such as Qwen3's <think>) come after the BPE's ids, as in
    Qwen's files. bos/eos/pad_token name tokens from those lists (None: null in the config, as Qwen's bos).
    add_bos_token=True makes plain encoding start with BOS (DeepSeek). split is the pre-tokenizer's regex (None:
    GPT-2's, as GPT-NeoX and OLMoE). chat_template goes into
    tokenizer_config.json, or into chat_template.jinja with template_file=True (GLM-4.5). generation_eos
    merges {"eos_token_id": [their ids]} (and bos_token_id) into the folder's generation_config.json, so call
    this after saving a model. The same arguments always give the same bytes.
    """
    tail = [*special_tokens, *plain_tokens]
    if vocab_size < 256 + len(head_tokens) + len(tail) + 16:
        raise ValueError(f"vocab_size {vocab_size} leaves too few merges beside 256 bytes and {len(head_tokens) + len(tail)} added tokens")
    tokenizer = Tokenizer.from_str(_train_bytelevel(vocab_size - len(tail), split, tuple(head_tokens)))
    if add_bos_token and bos_token is not None:
        # DeepSeek-V3's tokenizer.json: the BOS comes from the post-processor
        tokenizer.post_processor = processors.Sequence(
            [processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))])]
        )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_tokens])
    ids = {t: tokenizer.token_to_id(t) for t in [*head_tokens, *tail]}
    missing = [t for t in (bos_token, eos_token, pad_token, *generation_eos) if t is not None and t not in ids]
    if missing:
        raise ValueError(f"{missing} must be among the head, special or plain tokens")

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": tokenizer_class,
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                          "special": t not in plain_tokens}
            for t in ids
        },
    }
    if chat_template is not None and not template_file:
        config["chat_template"] = chat_template
    elif chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if generation_eos:
        path = folder / "generation_config.json"
        generation = json.loads(path.read_text()) if path.is_file() else {}
        generation["eos_token_id"] = [ids[t] for t in generation_eos]
        if bos_token is not None:
            generation["bos_token_id"] = ids[bos_token]
        path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return ids


# --- Gemma 4's BPE with byte fallback -------------------------------------------------------------------------

GEMMA4_HEAD = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as in Gemma's files
# the chat format's tokens (Gemma 4's template and the converter's list of them); the ids are ours, not Google's
GEMMA4_SPECIAL = ("<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>",
                  "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|image|>", "<|audio|>", "<|video|>")
# generation_config.json's eos_token_id ([1, 106, 50] in Google's files): a turn ends at <turn|>, and an answer that
# called tools at <|tool_response>, where the results go
GEMMA4_GENERATION_EOS = ("<eos>", "<turn|>", "<|tool_response>")


@functools.cache
def _train_gemma(n_pieces: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The pieces (the alphabet first) and merges of a BPE trained on `corpus_text()` in Gemma's layout: spaces
    written as "▁", no pre-tokenizer split, so pieces may span words."""
    tokenizer = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, show_progress=False)
    tokenizer.train_from_iterator(corpus_text().splitlines(keepends=True), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    return tuple(pieces), tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"])


def train_gemma_tokenizer(folder: pathlib.Path, chat_template: str | None = chat_templates.GEMMA4, *, vocab_size: int = 512) -> dict[str, int]:
    """Write a tokenizer in the layout of Gemma 4's checkpoints into `folder`: tokenizer.json (a BPE over "▁"-spaced
    text with byte fallback to <0x00>..<0xFF>, <bos> added by the post-processor), tokenizer_config.json
    (GemmaTokenizer, add_bos_token), chat_template.jinja, and generation_config.json's eos_token_id (<eos> and
    <turn|>, merged into the file: call this after saving a model). Returns the id of every special token."""
    tail = [*GEMMA4_HEAD, *GEMMA4_SPECIAL, *(f"<0x{b:02X}>" for b in range(256))]
    pieces, merges = _train_gemma(vocab_size - len(tail))
    vocab = {token: i for i, token in enumerate([*tail, *(p for p in pieces if p not in tail)])}
    if len(vocab) != vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for {len(tail)} special and byte tokens and the alphabet")
    specials = [*GEMMA4_HEAD, *GEMMA4_SPECIAL]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t in specials],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<bos>": {"id": "<bos>", "ids": [vocab["<bos>"]], "tokens": ["<bos>"]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
        "added_tokens_decoder": {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                 "single_word": False, "special": True} for t in specials},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    path = folder / "generation_config.json"
    generation = json.loads(path.read_text()) if path.is_file() else {}
    generation.update(bos_token_id=vocab["<bos>"], eos_token_id=[vocab[t] for t in GEMMA4_GENERATION_EOS], pad_token_id=vocab["<pad>"])
    path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return {t: vocab[t] for t in specials}

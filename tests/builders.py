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
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

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

"""Specification of moe_local.tokenizer, checked against sentencepiece and transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece

from builders import corpus_text, train_tokenizer
from moe_local.errors import TokenizerError
from moe_local.tokenizer import MIXTRAL_CHAT_TEMPLATE, StreamDecoder, Tokenizer, load_tokenizer

KINDS = ("sentencepiece", "json")
# 320 is the suite's default (few merges, much byte fallback); 1000 merges whole words.
VOCAB_SIZES = (320, 1000)

PLAIN_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café: 🎉 日本語 — ½",
    " one leading space",
    "   three leading spaces",
    "trailing space ",
    "line one\nline two\n\n    indented line\n",
    "\nstarts with a newline",
    "tab\tseparated\tvalues",
    "digits 1234567890 and 3.14159",
    "",
    " ",
]


def python_source_excerpt() -> str:
    return corpus_text()[5000:9000]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """One trained tokenizer folder per (kind, vocab_size)."""
    made = {}
    for vocab_size in VOCAB_SIZES:
        for kind in KINDS:
            folder = tmp_path_factory.mktemp(f"{kind}-{vocab_size}")
            train_tokenizer(folder, vocab_size=vocab_size, kind=kind)
            made[kind, vocab_size] = folder
    return made


@pytest.fixture(scope="session")
def transformers_reference(folders, tmp_path_factory):
    """transformers' tokenizer for each vocab size, loaded as a real Mixtral checkpoint folder would be.

    With config.json saying "mixtral", transformers 5 uses tokenizer.json as written. Both kinds
    share one tokenizer.model (training is deterministic), so this is the reference for both:
    transformers 5 cannot read a lone tokenizer.model without protobuf, and with it converts
    the model without sentencepiece's dummy prefix.
    """
    transformers = pytest.importorskip("transformers")
    references = {}
    for vocab_size in VOCAB_SIZES:
        folder = tmp_path_factory.mktemp(f"mixtral-checkpoint-{vocab_size}")
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(folders["json", vocab_size] / name, folder / name)
        (folder / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
        references[vocab_size] = transformers.AutoTokenizer.from_pretrained(folder)
    return references


CASES = [(kind, size) for size in VOCAB_SIZES for kind in KINDS]


@pytest.fixture(params=CASES, ids=[f"{kind}-{size}" for kind, size in CASES])
def case(request, folders):
    kind, vocab_size = request.param
    return kind, vocab_size, folders[kind, vocab_size]


@pytest.fixture
def tok(case) -> Tokenizer:
    return load_tokenizer(case[2])


@pytest.fixture
def sp_reference(case):
    """Plain sentencepiece on the same tokenizer.model: what Mistral's reference code runs."""
    return sentencepiece.SentencePieceProcessor(model_file=str(case[2] / "tokenizer.model"))


# --- the test helper itself -------------------------------------------------------------


def test_builder_is_deterministic(tmp_path, folders):
    train_tokenizer(tmp_path, kind="json")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (folders["json", 320] / name).read_bytes()


def test_both_kinds_share_one_sentencepiece_model(folders):
    for vocab_size in VOCAB_SIZES:
        sp_model = (folders["sentencepiece", vocab_size] / "tokenizer.model").read_bytes()
        assert sp_model == (folders["json", vocab_size] / "tokenizer.model").read_bytes()
        assert not (folders["sentencepiece", vocab_size] / "tokenizer.json").exists()


def test_builder_uses_mixtral_special_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_json_folder_loads_with_transformers_auto_tokenizer(folders):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(folders["json", 320])
    ours = load_tokenizer(folders["json", 320])
    assert reference("Hello world")["input_ids"] == ours.encode("Hello world")


# --- encode -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [*PLAIN_TEXTS, python_source_excerpt()])
def test_encode_matches_transformers_for_sentencepiece_model_and_tokenizer_json(
    case, tok, transformers_reference, text
):
    assert tok.encode(text) == transformers_reference[case[1]](text)["input_ids"]


@pytest.mark.parametrize("text", [*PLAIN_TEXTS, python_source_excerpt()])
def test_encode_matches_sentencepiece_with_bos_prepended(tok, sp_reference, text):
    assert tok.encode(text) == [1, *sp_reference.encode(text)]


def test_leading_space_is_kept_beside_the_dummy_prefix(tok):
    # sentencepiece adds "▁" even before an existing space, so " a" and "a" differ.
    assert tok.encode(" a", bos=False) != tok.encode("a", bos=False)
    assert tok.decode(tok.encode(" a")) == " a"


def test_encode_without_bos(tok):
    assert tok.encode("Hello", bos=False) == tok.encode("Hello")[1:]


def test_add_bos_token_false_in_config_means_no_bos(tmp_path, folders):
    shutil.copy(folders["sentencepiece", 320] / "tokenizer.model", tmp_path)
    config = json.loads((folders["sentencepiece", 320] / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 1
    assert tok.encode("Hello") == tok.encode("Hello", bos=False)


def test_special_token_strings_in_text_become_their_ids(tok):
    assert tok.encode("Hello</s>", bos=False)[-1] == tok.eos_id
    assert tok.encode("<s>Hello", bos=False)[0] == tok.bos_id
    assert tok.encode("a</s>b</s>", bos=False).count(tok.eos_id) == 2


@pytest.mark.parametrize("text", ["a</s>b", "x </s> y", "<s>[INST] hi [/INST]", "</s></s>", "<unk>"])
def test_both_kinds_agree_on_text_with_special_tokens(folders, text):
    for vocab_size in VOCAB_SIZES:
        from_model = load_tokenizer(folders["sentencepiece", vocab_size]).encode(text)
        assert from_model == load_tokenizer(folders["json", vocab_size]).encode(text)


def test_text_after_a_special_token_gets_its_own_dummy_prefix(tok, sp_reference):
    assert tok.encode("a</s>b", bos=False) == [*sp_reference.encode("a"), 2, *sp_reference.encode("b")]


@pytest.fixture(scope="session")
def control_token_folders(tmp_path_factory):
    made = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(f"control-{kind}")
        train_tokenizer(folder, vocab_size=400, kind=kind, control_tokens=("[INST]", "[/INST]"))
        made[kind] = folder
    return made


@pytest.mark.parametrize("kind", KINDS)
def test_added_special_tokens_from_tokenizer_config_encode_as_single_ids(control_token_folders, kind):
    tok = load_tokenizer(control_token_folders[kind])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(control_token_folders[kind] / "tokenizer.model"))
    ids = tok.encode("[INST] hi [/INST]")
    assert ids == [1, 3, *sp.encode(" hi "), 4]
    # Special tokens are skipped; of "▁▁hi▁" only the dummy prefix is dropped.
    assert tok.decode(ids) == " hi "
    assert tok.vocab_size == 400


def test_added_special_tokens_match_transformers(control_token_folders, tmp_path):
    transformers = pytest.importorskip("transformers")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(control_token_folders["json"] / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "[INST] hi [/INST] there</s>[INST] again [/INST]"
    expected = reference(text)["input_ids"]
    for kind in KINDS:
        assert load_tokenizer(control_token_folders[kind]).encode(text) == expected


# --- decode -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [*PLAIN_TEXTS, python_source_excerpt()])
def test_decode_round_trips_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_skips_bos_and_eos(tok):
    assert tok.decode([tok.bos_id, *tok.encode("Hello", bos=False), tok.eos_id]) == "Hello"


def test_decode_matches_transformers(case, tok, transformers_reference):
    ids = tok.encode("naïve café: 🎉 日本語</s>")
    assert tok.decode(ids) == transformers_reference[case[1]].decode(ids, skip_special_tokens=True)


def test_vocab_size_counts_every_piece(tok, sp_reference):
    assert tok.vocab_size == sp_reference.get_piece_size()


# --- chat templates -----------------------------------------------------------------------

TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]


def test_builtin_mixtral_template_renders_two_turns(tok, sp_reference):
    expected = "<s>[INST] Hi there [/INST] Hello!</s>[INST] How are you? [/INST]"
    assert tok.chat_template is None
    assert tok.render_chat_text(TWO_TURNS) == expected
    ids = tok.render_chat(TWO_TURNS)
    assert ids == tok.encode(expected, bos=False)
    # As Mistral's reference code builds it: each [INST] block and reply encoded on its own.
    sp = sp_reference
    first, reply = sp.encode("[INST] Hi there [/INST]"), sp.encode("Hello!")
    second = sp.encode("[INST] How are you? [/INST]")
    assert ids == [1, *first, *reply, 2, *second]


def test_builtin_mixtral_template_puts_system_message_into_first_user_turn(tok):
    messages = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS]
    expected = "<s>[INST] Answer briefly.\n\nHi there [/INST] Hello!</s>[INST] How are you? [/INST]"
    assert tok.render_chat_text(messages) == expected
    assert tok.render_chat(messages) == tok.encode(expected, bos=False)


def test_rendered_chat_has_exactly_one_bos(tok):
    ids = tok.render_chat(TWO_TURNS)
    assert ids[0] == tok.bos_id
    assert ids.count(tok.bos_id) == 1


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
    ],
)
def test_builtin_template_rejects_roles_that_do_not_alternate(tok, messages):
    with pytest.raises(TokenizerError, match="chat template failed"):
        tok.render_chat(messages)


CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("kind", KINDS)
def test_custom_template_from_tokenizer_config_is_used(tmp_path, kind):
    train_tokenizer(tmp_path, kind=kind, chat_template=CUSTOM_TEMPLATE)
    tok = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.chat_template == CUSTOM_TEMPLATE
    assert tok.render_chat(messages) == tok.encode("<s><|user|>Hi</s><|assistant|>", bos=False)
    assert tok.render_chat(messages, add_generation_prompt=False) == tok.encode("<|user|>Hi</s>")


def test_named_chat_templates_use_the_default_one(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CUSTOM_TEMPLATE}]
    train_tokenizer(tmp_path, chat_template=named)
    assert load_tokenizer(tmp_path).chat_template == CUSTOM_TEMPLATE


def test_chat_template_jinja_file_is_used_when_config_has_none(tmp_path):
    train_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(CUSTOM_TEMPLATE)
    assert load_tokenizer(tmp_path).chat_template == CUSTOM_TEMPLATE


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ raise_exception('no system messages here') }}", "no system messages here"),
        ("{% for m in messages %}{{ m['content'] }}", "syntax error"),
        ("{{ messages.__class__.__mro__ }}", "unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ messages.append(1) }}", "unsafe"),
        ("{{ nothing.here }}", "undefined"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ],
)
def test_failing_or_unsafe_template_raises_tokenizer_error(folders, template, message):
    tok = load_tokenizer(folders["sentencepiece", 320])
    tok.chat_template = template
    with pytest.raises(TokenizerError, match="chat template failed") as failure:
        tok.render_chat([{"role": "user", "content": "Hi"}])
    assert message in str(failure.value)


def test_builtin_template_is_jinja_that_transformers_renders_the_same(folders):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(folders["json", 320])
    rendered = reference.apply_chat_template(TWO_TURNS, chat_template=MIXTRAL_CHAT_TEMPLATE, tokenize=False)
    assert rendered == load_tokenizer(folders["json", 320]).render_chat_text(TWO_TURNS)


# --- loading errors -----------------------------------------------------------------------


def test_missing_tokenizer_names_folder_and_both_files(tmp_path):
    with pytest.raises(TokenizerError) as failure:
        load_tokenizer(tmp_path)
    message = str(failure.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 50])
def test_corrupt_tokenizer_model_names_the_file(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["", "{not json", '{"model": 1}'])
def test_corrupt_tokenizer_json_names_the_file(tmp_path, folders, content):
    shutil.copy(folders["json", 320] / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_corrupt_tokenizer_config_names_the_file(tmp_path, folders, content):
    shutil.copy(folders["sentencepiece", 320] / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_tokenizer_model_alone_is_enough(tmp_path, folders):
    shutil.copy(folders["sentencepiece", 320] / "tokenizer.model", tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (1, 2, None)
    assert tok.encode("a</s>") == [1, *tok.encode("a", bos=False), 2]


# --- streaming ----------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize(
    "text",
    [
        "naïve café: 🎉 日本語 — ½",
        " leading space",
        "two\n\nlines  with  gaps ",
        "x </s> y",
        python_source_excerpt(),
    ],
)
def test_streamed_pieces_concatenate_to_decode_of_all_ids(tok, text):
    ids = tok.encode(text, bos=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any(piece.endswith("\ufffd") for piece in pieces)


def test_stream_holds_back_an_incomplete_character(tok):
    ids = tok.encode("🎉", bos=False)
    assert len(ids) > 1  # the emoji is not in the vocabulary: it goes byte by byte
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "🎉"


def test_stream_keeps_the_space_before_each_word(tok):
    ids = tok.encode("the end", bos=False)
    assert "".join(stream(tok, ids + [tok.eos_id])) == "the end"


def test_flush_emits_what_is_held_back(tok):
    first_byte = tok.encode("é", bos=False)[-2]
    decoder = StreamDecoder(tok)
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == "\ufffd"


# --- text that is not valid UTF-8 ---------------------------------------------------------------------------

# Python keeps bytes that are not UTF-8 as lone surrogates (argv, stdin under the C locale): "import \xff os"
# arrives as "import \udcff os", which sentencepiece and tokenizers refuse with an error about C++ types.
@pytest.mark.parametrize("text", ["import \udcff os", "\ud800", "a\udcc3\udca9b"])
def test_lone_surrogates_encode_as_the_replacement_character(tok, text):
    replaced = "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)
    assert tok.encode(text) == tok.encode(replaced)
    messages = [{"role": "user", "content": text}]
    assert tok.render_chat(messages) == tok.render_chat([{"role": "user", "content": replaced}])
    assert "\ufffd" in tok.decode(tok.encode(text))

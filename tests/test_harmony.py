"""gpt-oss's harmony chat format: prompts as transformers' apply_chat_template renders them (reasoning effort,
developer messages, earlier reasoning dropped), generated ids split into the answer (final channel) and the
reasoning (analysis), and `run` and `chat` showing them, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_local
from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer
from conftest import moe_local_cli
from families import build_family
from moe_local.chat import ChatSession
from moe_local.errors import MoeLocalError
from moe_local.generate import SamplingParams
from moe_local.harmony import ChannelStream, is_harmony, split_channels
from moe_local.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 512
GREEDY = SamplingParams(temperature=0)
HIDDEN = "reasoning hidden; --show-reasoning shows it"

CONVERSATIONS = {
    "one message": [{"role": "user", "content": "Why is the sky blue?"}],
    "system message": [{"role": "system", "content": "Answer in one paragraph."}, {"role": "user", "content": "Why?"}],
    "developer message": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}],
    "answers that reasoned": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "thinking": "Easy: add them.", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "thinking": "Same again.", "content": "6"},
        {"role": "user", "content": "naïve café: 🎉 日本語\n\n  indented"},
    ],
}


@pytest.fixture(scope="module")
def harmony_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt_oss_tokenizer")
    train_bytelevel_tokenizer(folder, vocab_size=VOCAB, **FAMILY_TOKENIZERS["gpt_oss"])
    return folder


@pytest.fixture(scope="module")
def tok(harmony_folder):
    return load_tokenizer(harmony_folder)


@pytest.fixture(scope="module")
def reference(harmony_folder):
    return transformers.AutoTokenizer.from_pretrained(harmony_folder)


def build_scripted(folder: Path, script: str) -> None:
    """A tiny gpt-oss with the harmony tokenizer whose greedy decoding follows `script` (from the prompt's last
    token, the "t" of "<|start|>assistant"): every layer adds nothing to the residual stream (o_proj and the
    experts' down_proj zeroed), so the next token depends on the current one alone, through a one-hot embedding
    and lm_head. The model runs every piece still; only what it writes is chosen."""
    build_family("gpt_oss", folder, vocab_size=VOCAB)
    train_bytelevel_tokenizer(folder, vocab_size=VOCAB, **FAMILY_TOKENIZERS["gpt_oss"])
    ids = load_tokenizer(folder).encode(script, bos=False)
    following = {}
    for a, b in zip(ids, ids[1:]):
        assert following.setdefault(a, b) == b, f"token {a} is followed by two tokens in the script"
    state = load_file(folder / "model.safetensors")
    embed, head = torch.zeros_like(state["model.embed_tokens.weight"]), torch.zeros_like(state["lm_head.weight"])  # [V, D]
    one_hot = {token: k for k, token in enumerate(sorted(set(ids)))}
    for token, k in one_hot.items():
        embed[token, k] = 1.0
    for a, b in following.items():
        head[b, one_hot[a]] = 10.0
    state.update({"model.embed_tokens.weight": embed, "lm_head.weight": head, "model.norm.weight": torch.ones_like(state["model.norm.weight"])})
    for name in state:
        if name.endswith(("o_proj.weight", "o_proj.bias", "experts.down_proj", "experts.down_proj_bias")):
            state[name] = torch.zeros_like(state[name])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> Path:
    """Answers "Four." in the final channel at once."""
    folder = tmp_path_factory.mktemp("gpt_oss_answers")
    build_scripted(folder, "t<|channel|>final<|message|>Four.<|return|>")
    return folder


@pytest.fixture(scope="module")
def reasons(tmp_path_factory) -> Path:
    """Reasons "Think." in the analysis channel, message after message (one each 15 tokens, the first ending at the
    13th), and never answers."""
    folder = tmp_path_factory.mktemp("gpt_oss_reasons")
    build_scripted(folder, "t<|channel|>analysis<|message|>Think.<|end|><|start|>t")
    return folder


# --- the prompt ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("effort", [None, "low", "high"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_prompt_ids_equal_transformers_apply_chat_template(tok, reference, conversation, effort):
    messages = CONVERSATIONS[conversation]
    options = tok.reasoning_option(effort)
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **options)
    assert tok.render_chat_text(messages, **options) == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **options)
    assert tok.render_chat(messages, **options) == expected


def test_earlier_answers_reasoning_is_dropped_and_the_effort_is_in_the_system_message(tok):
    text = tok.render_chat_text(CONVERSATIONS["answers that reasoned"], **tok.reasoning_option("high"))
    assert "Easy: add them." not in text and "Same again." not in text
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|>" in text
    assert "\nReasoning: high\n" in text and text.endswith("<|end|><|start|>assistant")
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>" in text  # our system message
    assert "\nReasoning: medium\n" in tok.render_chat_text(CONVERSATIONS["one message"])  # the template's default


def test_reasoning_effort_is_refused_with_one_line_where_it_does_not_apply(tok, tmp_path):
    with pytest.raises(MoeLocalError, match="low, medium or high, not 'extreme'"):
        tok.reasoning_option("extreme")
    train_bytelevel_tokenizer(tmp_path, **FAMILY_TOKENIZERS["qwen3_moe"])
    qwen3 = load_tokenizer(tmp_path)
    with pytest.raises(MoeLocalError, match=r"no reasoning effort \(reasoning_effort\), so --reasoning-effort and /set reasoning do not apply"):
        qwen3.template_options(reasoning_effort="low")
    assert qwen3.template_options(think=False) == {"enable_thinking": False}
    assert is_harmony(tok) and not is_harmony(qwen3)


# --- the generated ids, split into channels ---------------------------------------------------------------


def stream(tok, text: str) -> tuple[ChannelStream, list[str], list[str]]:
    """Feed the ids of `text`, as generated after the prompt's <|start|>assistant: (the stream, the answer's
    pieces, the reasoning's pieces)."""
    reasoning: list[str] = []
    channels = ChannelStream(tok, reasoning.append)
    answer = [channels.push(i) for i in tok.encode(text, bos=False)]
    return channels, answer, reasoning


def test_analysis_then_final_become_reasoning_then_answer(tok):
    text = "<|channel|>analysis<|message|>They ask 2+2. Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is 4 — café ✓<|return|>"
    channels, answer, reasoning = stream(tok, text)
    assert "".join(answer) + channels.flush() == channels.answer == "It is 4 — café ✓"
    assert "".join(reasoning) == "They ask 2+2. Easy.\n"  # a newline after each reasoning message
    assert channels.reasoning == "They ask 2+2. Easy."
    assert sum(1 for piece in answer if piece) > 3  # streamed, not all at the end
    assert split_channels(tok, tok.encode(text, bos=False)) == ("It is 4 — café ✓", "They ask 2+2. Easy.")


def test_final_only_is_all_answer(tok):
    channels, answer, reasoning = stream(tok, "<|channel|>final<|message|>Four.<|return|>")
    assert "".join(answer) == "Four." and reasoning == [] and channels.reasoning == ""


def test_a_stream_cut_mid_way_keeps_what_came(tok):
    channels, answer, reasoning = stream(tok, "<|channel|>analysis<|message|>Let me thi")
    assert channels.channel == "analysis" and "".join(answer) == ""
    assert channels.flush() == "" and channels.reasoning == "Let me thi" and channels.answer == ""
    cut = "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>Fo"
    assert split_channels(tok, tok.encode(cut, bos=False)) == ("Fo", "Hm.")
    # cut in a header: nothing of it is text
    assert split_channels(tok, tok.encode("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|chan", bos=False)) == ("", "Hm.")


def test_a_tool_call_is_commentary_not_the_answer(tok):
    text = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    channels, answer, reasoning = stream(tok, text)
    assert channels.answer == "" and channels.reasoning == '{"city": "Paris"}'
    # a recipient in the role part of the header, as the template writes past calls
    recipient = '<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{}<|call|>'
    assert split_channels(tok, tok.encode(recipient, bos=False)) == ("", "Need weather.\n{}")


def test_a_message_without_a_channel_is_shown_as_the_answer(tok):
    assert split_channels(tok, tok.encode("<|message|>Four.<|end|>", bos=False)) == ("Four.", "")


# --- the engine stops at <|return|> and <|call|>, not at <|end|> -------------------------------------------


def test_end_does_not_stop_generation_return_and_call_do(reasons, tok):
    engine = moe_local.load(reasons, device="cpu")
    assert {tok.token_id(t) for t in ("<|return|>", "<|call|>", "<|endoftext|>")} <= engine.stop_ids
    assert tok.token_id("<|end|>") not in engine.stop_ids
    chat = ChatSession(engine, GREEDY, 32)
    chat.ask("2 + 2?")
    tokens = list(chat.reply())
    assert len(tokens) == 32 and tokens.count(tok.token_id("<|end|>")) >= 2  # message after message


# --- chat -------------------------------------------------------------------------------------------------


def test_chat_keeps_the_answer_and_its_reasoning_and_renders_as_the_template_says(reasons, answers, tmp_path):
    reference = transformers.AutoTokenizer.from_pretrained(reasons)
    chat = ChatSession(moe_local.load(reasons, device="cpu"), GREEDY, 28, system="Be brief.", reasoning_effort="low")
    chat.ask("2 + 2?")
    list(chat.reply())
    assert chat.messages[-1] == {"role": "assistant", "content": "", "thinking": "Think.\nThink."}
    assert chat.command("/set reasoning high") == "Set the reasoning effort to high." and chat.reasoning_effort == "high"
    with pytest.raises(MoeLocalError, match="not 'max'"):
        chat.command("/set reasoning max")
    assert chat.command(f"/save {tmp_path}/c.json").startswith("Saved")
    chat.ask("And 3 + 3?")
    messages = [{"role": "system", "content": "Be brief."}, *chat.messages]
    assert chat.prompt == reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, reasoning_effort="high")
    later = ChatSession(moe_local.load(answers, device="cpu"), GREEDY, 12)
    assert later.command(f"/load {tmp_path}/c.json").startswith("Loaded")
    assert later.messages[1]["thinking"] == "Think.\nThink."
    later.ask("Again?")
    list(later.reply())
    assert later.messages[-1] == {"role": "assistant", "content": "Four."}


def test_show_reasoning_is_refused_for_a_model_without_channels(tiny):
    with pytest.raises(MoeLocalError, match="--show-reasoning applies to models that answer in channels"):
        ChatSession(moe_local.load(tiny[0], device="cpu"), GREEDY, show_reasoning=True)


# --- the command line -------------------------------------------------------------------------------------


def test_run_prints_the_final_channel_as_the_answer_and_json_has_both(answers):
    reference = transformers.AutoTokenizer.from_pretrained(answers)
    result = moe_local_cli("run", str(answers), "-p", "2 + 2?", "--reasoning-effort", "low", "--json", "-q",
                           "--temperature", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    messages = [{"role": "user", "content": "2 + 2?"}]
    assert out["prompt_tokens"] == reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, reasoning_effort="low")
    assert out["text"] == "Four." and out["reasoning"] == "" and out["stats"]["finish_reason"] == "stop"
    plain = moe_local_cli("run", str(answers), "-p", "2 + 2?", "--temperature", "0", "--device", "cpu")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "Four.\n" and HIDDEN not in plain.stderr  # no reasoning: nothing to hide


def test_run_hides_the_reasoning_and_says_so_once_or_shows_it_dimmed_on_stderr(reasons):
    args = ("run", str(reasons), "-p", "2 + 2?", "-n", "45", "--temperature", "0", "--device", "cpu")
    hidden = moe_local_cli(*args)
    assert hidden.returncode == 0, hidden.stderr
    assert hidden.stdout == "\n" and "Think." not in hidden.stderr
    assert hidden.stderr.count(HIDDEN) == 1
    assert "(stopped while the model was still reasoning, before its answer: raise -n/--max-new-tokens)" in hidden.stderr
    shown = moe_local_cli(*args, "--show-reasoning")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "\n" and "Think.\nThink.\nThink.\n" in shown.stderr and HIDDEN not in shown.stderr
    as_json = moe_local_cli(*args, "--json", "-q")
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    assert out["text"] == "" and out["reasoning"].startswith("Think.\nThink.") and as_json.stderr == ""


def test_chat_takes_the_reasoning_options_and_the_set_command(answers):
    result = moe_local_cli("chat", str(answers), "--reasoning-effort", "high", "--show-reasoning", "--temperature", "0",
                           "--device", "cpu", "-q", input="2 + 2?\n/set reasoning low\n/bye\n")
    assert result.returncode == 0, result.stderr
    assert "Four.\n" in result.stdout and "Set the reasoning effort to low." in result.stdout


def test_reasoning_options_are_refused_with_one_line_where_they_do_not_apply(answers, tiny):
    refused = {
        (str(tiny[0]), "--reasoning-effort", "low"): "error: this model's chat template has no reasoning effort (reasoning_effort), "
                                                     "so --reasoning-effort and /set reasoning do not apply",
        (str(tiny[0]), "--show-reasoning"): "error: --show-reasoning applies to models that answer in channels (gpt-oss's harmony "
                                            "format); this model's answers are plain text",
        (str(answers), "--reasoning-effort", "extreme"): "error: the reasoning effort is low, medium or high, not 'extreme'",
        (str(answers), "--raw", "--show-reasoning"): "error: --reasoning-effort and --show-reasoning work through the chat "
                                                     "template, and --raw leaves it out",
    }
    # a value no model takes, and flags that cannot go together: status 2, as the parser's own errors
    usage = {(str(answers), "--reasoning-effort", "extreme"), (str(answers), "--raw", "--show-reasoning")}
    for args, message in refused.items():
        result = moe_local_cli("run", *args, "-p", "Hi", "--device", "cpu")
        assert (result.returncode, result.stderr.strip()) == (2 if args in usage else 1, message)
    chat = moe_local_cli("chat", str(tiny[0]), "--show-reasoning", "--device", "cpu", input="/bye\n")
    assert (chat.returncode, chat.stderr.strip()) == (1, refused[(str(tiny[0]), "--show-reasoning")])
    chat = moe_local_cli("chat", str(answers), "--reasoning-effort", "extreme", "--device", "cpu", input="/bye\n")
    assert (chat.returncode, chat.stderr.strip()) == (2, refused[(str(answers), "--reasoning-effort", "extreme")])


# --- the server ----------------------------------------------------------------------------------------


def test_the_server_answers_with_the_final_channel_and_gives_the_reasoning_apart(answers, reasons):
    """Chat completions of a harmony model: `content` is the final channel, the rest is `reasoning_content`
    (as vLLM and DeepSeek's API name it), whole and streamed; `reasoning_effort` reaches the template."""
    import httpx

    from test_server import RunningServer

    ask = {"messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": 20, "temperature": 0}
    server = RunningServer(str(answers))
    try:
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={**ask, "reasoning_effort": "high"}, timeout=60).json()
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Four."}
        assert reply["choices"][0]["finish_reason"] == "stop"
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={**ask, "reasoning_effort": "extreme"}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "reasoning_effort"
    finally:
        server.stop()
    server = RunningServer(str(reasons))
    try:
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=ask, timeout=60).json()
        message = reply["choices"][0]["message"]
        assert message["content"] == "" and message["reasoning_content"].startswith("Think.")
        events = []
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**ask, "stream": True}, timeout=60) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
        assert "".join(d.get("content", "") for d in deltas) == ""
    finally:
        server.stop()

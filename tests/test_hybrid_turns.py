"""A recurrent state that survives turns (Qwen3.5/3.6-MoE, Qwen3-Next): a prompt that leaves what a sequence's
cache holds resumes from the longest snapshot of its recurrent states within the prompt (`engine.Snapshot`: the
end of each prefill, and the marks it was given, such as where a chat's conversation ends before the answer), in
`Engine.prefill`, in `chat` and in `serve`'s prefix reuse; and answers as a fresh run over the whole prompt."""

from __future__ import annotations

from types import SimpleNamespace

import openai
import psutil
import pytest
import torch

import moe_local
from builders import FAMILY_TOKENIZERS, train_bytelevel_tokenizer
from families import build_family
from test_server import THREADS, RunningServer
from moe_local.budget import SNAPSHOTS, host_bytes_needed
from moe_local.chat import ChatSession
from moe_local.errors import BudgetError
from moe_local.generate import SamplingParams

GREEDY = SamplingParams(temperature=0)


def chat_hybrid(variant: str, folder):
    """A tiny hybrid with Qwen3's byte-level tokenizer and chat template: an earlier answer is rendered without
    the generation prompt's empty thinking block (think off), so a second turn's prompt leaves the first's
    prompt and answer before the first prompt's end, as Qwen3.5's template does."""
    build_family(variant, folder, vocab_size=512)
    train_bytelevel_tokenizer(folder, **FAMILY_TOKENIZERS["qwen3_moe"])
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny hybrids by family, each built once for the module."""
    folders = {}

    def folder(variant: str):
        if variant not in folders:
            folders[variant] = chat_hybrid(variant, tmp_path_factory.mktemp(variant))
        return folders[variant]

    return folder


@pytest.fixture(scope="module", params=["qwen3_5_moe", "qwen3_next"])
def hybrid(request, built):
    return built(request.param)


def load(folder, **options):
    return moe_local.load(folder, device="cpu", dtype="fp32", ctx_size=256, **options)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(engine, prompt: list[int], n: int, marks: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[int], int]:
    """Prefill (with marks), then n greedy tokens: the prompt's last logits, the tokens, the tokens evaluated."""
    logits, evaluated = engine.prefill(prompt, marks=marks)
    tokens = [int(logits.argmax())]
    for _ in range(n - 1):
        tokens.append(int(engine.decode_one(tokens[-1]).argmax()))
    return logits, tokens, evaluated


def fresh(folder, prompt: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    logits, tokens, evaluated = greedy(load(folder), prompt, n)
    assert evaluated == len(prompt)
    return logits, tokens


def test_a_prompt_that_leaves_the_cache_resumes_at_the_last_prompts_end_and_answers_as_a_fresh_run(hybrid):
    engine = load(hybrid)
    first = [1] + ids(19, 0)
    greedy(engine, first, 4)  # the cache now holds the prompt and 3 of the answer's tokens
    second = first + ids(7, 1)  # not the answer: the state after it is of no use, the snapshot at `first` is
    logits, tokens, evaluated = greedy(engine, second, 5)
    assert evaluated == 7
    want_logits, want_tokens = fresh(hybrid, second, 5)
    assert tokens == want_tokens
    assert (logits - want_logits).abs().max() <= 1e-5 * want_logits.abs().max()


def test_a_mark_keeps_a_snapshot_inside_the_prompt_and_a_prompt_within_none_starts_over(hybrid):
    engine = load(hybrid)
    prompt = [1] + ids(29, 2)
    greedy(engine, prompt, 2, marks=(12, 40))  # 40: past the prompt, ignored
    assert [len(s.ids) for s in engine.sequence.snapshots] == [12, 30]
    branch = prompt[:12] + ids(5, 3)
    logits, tokens, evaluated = greedy(engine, branch, 4)
    assert evaluated == 5
    assert tokens == fresh(hybrid, branch, 4)[1]
    # the snapshot at 30 no longer matches the cache's tokens and is dropped; one within 12 there is none of
    assert [len(s.ids) for s in engine.sequence.snapshots] == [12, 17]
    assert greedy(engine, prompt[:8] + ids(3, 4), 1)[2] == 11


def test_a_sequence_keeps_its_newest_snapshots_only(hybrid):
    engine = load(hybrid)
    prompt = [1]
    for turn in range(SNAPSHOTS + 2):
        prompt = prompt + ids(4, 10 + turn)
        engine.prefill(prompt)
    kept = engine.sequence.snapshots
    assert [len(s.ids) for s in kept] == [len(prompt) - 4 * i for i in reversed(range(SNAPSHOTS))]
    state_bytes = sum(t.nbytes for t in kept[0].states)
    linear = [layer for block, layer in zip(engine.model.layers, engine.kv.layers) if block.attention.recurrent]
    assert state_bytes == sum(t.nbytes for layer in linear for t in layer)  # a copy of the recurrent states, no more


def test_the_plan_counts_the_snapshots_the_sequences_keep_and_a_load_they_tip_over_says_so(hybrid, monkeypatch):
    engine = load(hybrid, sequences=2)
    served = [engine.sequence, engine.new_sequence()]
    for seed, seq in enumerate(served):
        engine.prefill([1] + ids(29, 20 + seed), seq, marks=(8, 16, 24))
    kept = [t.nbytes for seq in served for s in seq.snapshots for t in s.states]
    assert [len(seq.snapshots) for seq in served] == [SNAPSHOTS] * 2
    assert engine.plan.snapshot_bytes == sum(kept) > 0  # the most both rows keep, as planned
    needed = host_bytes_needed(engine.plan)
    assert needed == engine.store.total_bytes + engine.plan.fixed_bytes + engine.plan.snapshot_bytes
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=needed - 1))
    with pytest.raises(BudgetError, match=r"need .* of host RAM but only .* is available; the snapshots of the linear-attention "
                                          r"layers' state tip it \(4 per sequence x 2 sequences, .*\): fewer --parallel rows keep fewer"):
        load(hybrid, sequences=2, experts_dtype="fp32")


def test_a_chats_second_turn_evaluates_from_where_the_first_conversation_ended(hybrid):
    """Qwen3's template drops the empty thinking block the first prompt ended with, so the second prompt leaves
    the first inside its generation prompt: it resumes at the first conversation's end (the mark the chat gives
    its prefill) and evaluates the rest, the first answer as rendered included; and answers as a fresh run."""
    chat = ChatSession(load(hybrid), GREEDY, 5, think=False)
    chat.ask("Why is the sky blue?")
    first_prompt, (closed,) = chat.prompt, chat.marks
    assert closed < len(first_prompt) - 4  # <|im_start|>assistant\n<think>\n\n</think>\n\n after it
    list(chat.reply())
    chat.ask("And the sea?")
    second = list(chat.reply())
    assert chat.stats.prompt_tokens_evaluated == len(chat.prompt) - closed
    reference = load(hybrid)
    assert second == list(reference.generate(chat.prompt, 5, GREEDY))


def test_a_servers_second_chat_request_resumes_from_the_first_prompts_end(built):
    """The client sends the first answer back otherwise than it was generated (edited, or its reasoning
    stripped): the second request resumes at the first prompt's end, kept at its prefill's end, and answers as
    the library does on the whole prompt. One family: the server's part is the same for both."""
    qwen3_5 = built("qwen3_5_moe")
    server = RunningServer(str(qwen3_5), "--parallel", "2", ctx=256)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        first = client.chat.completions.create(model="m", messages=messages, max_tokens=5, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        turn = messages + [{"role": "assistant", "content": "Light scatters."}, {"role": "user", "content": "And the sea?"}]
        second = client.chat.completions.create(model="m", messages=turn, max_tokens=5, temperature=0)
    finally:
        server.stop()
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # as the server's, so that the answers can be compared bit for bit
    try:
        engine = load(qwen3_5)
        prompt = engine.tokenizer.render_chat(turn)
        assert second.choices[0].message.content == engine.tokenizer.decode(list(engine.generate(prompt, 5, GREEDY)))
    finally:
        torch.set_num_threads(threads)

"""Batched decode: several sequences, each with its own KV cache and positions, fed in one forward pass
give what each gives alone (fp32: the same greedy tokens, logits within 1e-5); the `Batcher` admits,
prefills, decodes and retires requests between steps and reuses a cached prefix."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

import moe_local
from moe_local.batch import Batcher, Output, Request
from moe_local.engine import Sequence
from moe_local.generate import SamplingParams
from moe_local.grammar import GrammarError, Grammars, json_grammar, vocabulary
from moe_local.model import KVCache, KVPool

from families import build_variant

GREEDY = SamplingParams(temperature=0)
# relative to the largest logit: matmuls over B rows may round differently from one row, even in fp32
RTOL = 1e-5


@pytest.fixture(scope="module", params=["mixtral", "mixtral-window", "gpt_oss", "deepseek_v3", "minimax_m2", "qwen3_next", "gemma4", "deepseek_v32", "glm_moe_dsa"])
def engine(request, tmp_path_factory, tokenizer_dir):
    """Full attention (Mixtral); a sliding window of 6 in a ring (Mixtral); sliding windows of 6 in rings,
    with sinks (gpt-oss); latent attention (DeepSeek); q/k norms over the whole projections and a quarter of
    each head rotated (MiniMax-M2); linear attention's recurrent states beside gated full attention
    (Qwen3-Next), which a new prompt resumes only where it extends all a sequence holds; sliding and full
    layers of two geometries, sandwich norms, a dense MLP beside the experts (Gemma 4); the sparse attention's
    indexer keeping 6 of the past tokens (DeepSeek-V3.2), and a layer keeping what the layer before kept (GLM-5.2)."""
    folder = tmp_path_factory.mktemp(request.param)
    build_variant(request.param, folder, tokenizer_dir)
    return moe_local.load(folder, device="cpu", expert_slots=5)


def prompt(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, 300, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def own_caches(engine, n: int) -> list[Sequence]:
    return [Sequence(KVCache(engine.cfg, engine.ctx_size, engine.dtype, engine.device), []) for _ in range(n)]


def pool_rows(engine, n: int) -> list[Sequence]:
    pool = KVPool(engine.cfg, engine.ctx_size, engine.dtype, engine.device, n)
    return [Sequence(pool.cache(row), []) for row in range(n)]


def alone(engine, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits, the sequence on its own (the engine's single-sequence path)."""
    (seq,) = own_caches(engine, 1)
    logits, _ = engine.prefill(ids, seq)
    tokens, steps = [], [logits]
    for _ in range(n - 1):
        tokens.append(int(logits.argmax()))
        logits = engine._forward([tokens[-1]], len(seq.tokens), False, seq)[-1]
        steps.append(logits)
    return tokens + [int(logits.argmax())], steps


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max() <= RTOL * want.abs().max()


@pytest.mark.parametrize("caches", [own_caches, pool_rows])
def test_sequences_decoded_together_match_each_alone_as_they_join_and_leave(engine, caches):
    """With caches of their own the attention core runs per sequence; as rows of one pool it runs once for
    the batch, over the rows between the batch's first and last (a row outside it, here the second after it
    leaves, is masked out)."""
    join_and_leave(engine, caches)


@pytest.mark.gpu
@pytest.mark.parametrize("caches", [own_caches, pool_rows])
def test_sequences_decoded_together_on_cuda_match_each_alone(tmp_path, tokenizer_dir, caches):
    build_variant("mixtral-window", tmp_path, tokenizer_dir)
    join_and_leave(moe_local.load(tmp_path, device="cuda", expert_slots=5), caches)


def join_and_leave(engine, caches) -> None:
    # sequence i joins at step joins[i] and leaves after lengths[i] tokens; prompts cross the window of 6
    prompts, lengths, joins = [prompt(3, 0), prompt(9, 1), prompt(14, 2), prompt(5, 3)], [12, 4, 9, 6], [0, 0, 2, 5]
    expected = [alone(engine, p, n) for p, n in zip(prompts, lengths)]
    seqs = caches(engine, len(prompts))
    got: list[list[int]] = [[] for _ in prompts]
    step = 0
    while any(len(g) < n for g, n in zip(got, lengths)):
        for i in range(len(prompts)):
            if joins[i] == step:
                logits, _ = engine.prefill(prompts[i], seqs[i])
                assert_close(logits, expected[i][1][0])
                got[i].append(int(logits.argmax()))
        batch = [i for i in range(len(prompts)) if joins[i] < step and 0 < len(got[i]) < lengths[i]]
        if batch:
            logits = engine.decode_batch([seqs[i] for i in batch], [got[i][-1] for i in batch])
            for i, row in zip(batch, logits):
                assert_close(row, expected[i][1][len(got[i])])
                got[i].append(int(row.argmax()))
        step += 1
    assert got == [tokens for tokens, _ in expected]


def run_requests(batcher: Batcher, requests: list[Request]) -> None:
    for request in requests:
        batcher.submit(request)
    for _ in range(1000):  # the loop's steps, on this thread: bounded, no thread to wait for
        batcher.poll()
        if not batcher.waiting and not batcher.running:
            return
    raise AssertionError("the requests did not finish in 1000 steps")


def collect(outputs: list[Output]):
    return outputs.append


def text_of(outputs: list[Output]) -> str:
    return "".join(o.text for o in outputs)


def test_batcher_answers_every_request_as_generate_would(engine):
    prompts, limits = [prompt(4, 5), prompt(11, 6), prompt(7, 7), prompt(4, 5)], [6, 3, 9, 2]
    expected = []
    for p, n in zip(prompts, limits):
        engine.tokens = []
        expected.append(engine.tokenizer.decode(list(engine.generate(p, n, GREEDY))))
    batcher = Batcher(engine, parallel=3)  # four requests for three sequences: the last one waits
    outputs = [[] for _ in prompts]
    run_requests(batcher, [Request(p, n, GREEDY, collect(o)) for p, n, o in zip(prompts, limits, outputs)])
    for want, n, outs in zip(expected, limits, outputs):
        assert text_of(outs) == want
        assert (outs[-1].finish_reason, outs[-1].error, outs[-1].completion_tokens) == ("length", None, n)
    assert len(batcher.free) == 3


def test_a_prompt_that_extends_a_finished_one_evaluates_only_the_new_tokens(engine):
    batcher = Batcher(engine, parallel=2)
    first = prompt(10, 8)
    run_requests(batcher, [Request(first, 5, GREEDY, collect([]))])
    held = max(batcher.free, key=lambda s: len(s.tokens)).tokens
    assert held[: len(first)] == first and len(held) == len(first) + 4  # the last token was never fed
    follow_up, outs = held + prompt(6, 9)[1:], []
    run_requests(batcher, [Request(follow_up, 3, GREEDY, collect(outs))])
    assert (outs[-1].prompt_tokens, outs[-1].cached_tokens) == (len(follow_up), len(held))
    engine.tokens = []
    assert text_of(outs) == engine.tokenizer.decode(list(engine.generate(follow_up, 3, GREEDY)))


def test_going_back_in_a_cache_recomputes_what_a_sliding_ring_overwrote(engine):
    seq, fresh = engine.new_sequence(), engine.new_sequence()
    engine.prefill(prompt(20, 10), seq)
    other = prompt(20, 10)[:8] + prompt(6, 11)[1:]  # shares 8 ids, then differs: a window of 6 was overwritten since
    assert_close(engine.prefill(other, seq)[0], engine.prefill(other, fresh)[0])


def test_a_stop_string_ends_its_request_and_not_the_others(engine):
    engine.tokens = []
    text = engine.tokenizer.decode(list(engine.generate(prompt(5, 12), 8, GREEDY)))
    stop = text[len(text) // 2 :][:2]
    stopped, other = [], []
    batcher = Batcher(engine, parallel=2)
    run_requests(batcher, [Request(prompt(5, 12), 8, GREEDY, collect(stopped), stop=[stop]), Request(prompt(6, 14), 5, GREEDY, collect(other))])
    assert text_of(stopped) == text[: text.find(stop)] and stopped[-1].finish_reason == "stop"
    assert other[-1].finish_reason == "length" and other[-1].completion_tokens == 5


def test_a_cancelled_request_leaves_the_batch_and_frees_its_sequence(engine):
    batcher = Batcher(engine, parallel=2)
    outs = []
    request = Request(prompt(5, 15), 50, GREEDY, collect(outs))
    batcher.submit(request)
    batcher.poll()
    assert batcher.running
    request.cancelled = True
    batcher.poll()
    assert not batcher.running and len(batcher.free) == 2 and not any(o.finish_reason for o in outs)
    assert batcher.cancelled == 1


def test_a_failing_step_ends_its_requests_with_the_error_and_the_next_ones_run(engine, monkeypatch):
    batcher = Batcher(engine, parallel=2)
    failed, later = [], []

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "decode_batch", broken)
    run_requests(batcher, [Request(prompt(5, 16), 5, GREEDY, collect(failed))])
    assert failed[-1].error == "unexpected RuntimeError: boom"
    monkeypatch.undo()
    run_requests(batcher, [Request(prompt(5, 16), 5, GREEDY, collect(later))])
    assert later[-1].finish_reason == "length" and len(batcher.free) == 2


def test_a_stopped_batcher_gives_its_pool_rows_to_the_next(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu", ctx_size=64, sequences=3)
    first = Batcher(engine, parallel=3)
    outs = []
    first.submit(Request(prompt(5, 17), 50, GREEDY, collect(outs)))
    first.poll()
    first.stop()  # the request still running ends with an error; every sequence goes back
    assert outs[-1].error and first.free == []
    second = Batcher(engine, parallel=3)
    assert sorted(seq.kv.row for seq in second.free) == [0, 1, 2]
    assert all(seq.kv.pool is engine.kv_pool for seq in second.free)


def test_the_memory_plan_counts_a_kv_cache_per_parallel_sequence(tiny):
    folder, _ = tiny
    one = moe_local.load(folder, device="cpu", ctx_size=64)
    four = moe_local.load(folder, device="cpu", ctx_size=64, sequences=4)
    assert four.plan.kv_bytes == 4 * one.plan.kv_bytes == 4 * one.kv.nbytes


def test_requests_with_one_grammar_compile_it_once_and_answer_as_a_fresh_compile_would(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu", ctx_size=64, sequences=2)
    batcher = Batcher(engine, parallel=2)
    schemas = [{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"], "additionalProperties": False},
               {"enum": ["red", "green", "blue"]}]
    grammars = [json_grammar(s) for s in schemas]
    sampled = SamplingParams(temperature=1.0, seed=3)
    answers = [[] for _ in range(4)]
    run_requests(batcher, [Request(prompt(5, 20), 30, sampled, collect(answers[0]), grammar=grammars[0])])
    run_requests(batcher, [Request(prompt(5, 20), 30, sampled, collect(answers[1]), grammar=grammars[0])])  # from the cache
    run_requests(batcher, [Request(prompt(6, 21), 30, sampled, collect(answers[2]), grammar=grammars[0]),
                           Request(prompt(6, 22), 30, sampled, collect(answers[3]), grammar=grammars[1])])
    assert batcher.grammars.compiled == 2
    assert text_of(answers[1]) == text_of(answers[0])
    for outs, schema in zip(answers, [schemas[0]] * 3 + [schemas[1]]):
        assert outs[-1].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(outs)), schema)


def test_the_grammar_cache_keeps_the_most_recently_used(tiny, monkeypatch):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu", ctx_size=64)
    grammars = Grammars(vocabulary(engine.tokenizer, engine.cfg.vocab_size, sorted(engine.stop_ids)))
    monkeypatch.setattr(Grammars, "CACHED", 2)
    a, b, c = (json_grammar({"enum": [word]}) for word in ("a", "b", "c"))
    for grammar in (a, b, a, c):  # c pushes out b, the least recently used
        grammars.constraint(grammar)
    assert grammars.compiled == 3
    grammars.constraint(a)
    assert grammars.compiled == 3
    grammars.constraint(b)
    assert grammars.compiled == 4
    with pytest.raises(GrammarError, match="cannot be used"):
        grammars.constraint('start: <[99999]>')

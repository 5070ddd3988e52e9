"""The engine against the `transformers` reference, and the offloading runtime's invariances."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import moe_local
from moe_local import cpu_matmul, native
from conftest import build_mixtral, reference_model
from moe_local.experts.cache import POLICIES
from moe_local.experts.runtime import ResidentExperts
from moe_local.generate import GenerationStats, SamplingParams, generate
from moe_local.model import apply_rope, rope_cos_sin

GREEDY = SamplingParams(temperature=0)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [1] + torch.randint(3, 320, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of exactly n tokens (random models emit EOS early, so no stopping)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def greedy(engine, ids: list[int], n: int) -> list[int]:
    """Our greedy continuation of exactly n tokens, without stopping at EOS."""
    return list(generate(engine, ids, n, GREEDY, set(), GenerationStats()))


@pytest.mark.parametrize("fixture", ["tiny", "tiny_sharded"])
def test_fp32_logits_match_transformers(fixture, request, device):
    folder, reference = request.getfixturevalue(fixture)
    ids = prompt_ids(48)
    want = reference_logits(reference, ids)
    got = moe_local.load(folder, device=device, expert_slots=4).logits(ids)
    assert got.dtype == torch.float32 and got.shape == (48, 320)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_bf16_logits_match_transformers_and_compute_follows_checkpoint_dtype(tiny_bf16, device):
    folder, reference = tiny_bf16
    engine = moe_local.load(folder, device=device, expert_slots=4)
    assert engine.dtype == torch.bfloat16
    ids = prompt_ids(32)
    want = reference_logits(reference, ids)
    got = engine.logits(ids)
    # bf16 keeps 8 bits of mantissa; kernels differ in summation order, so allow a few ulps of the scale
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_fp16_checkpoint_runs_in_fp16_and_matches_transformers(tmp_path):
    reference = build_mixtral(tmp_path, None, dtype=torch.float16, seed=6)
    engine = moe_local.load(tmp_path, device="cpu")
    assert engine.dtype == torch.float16
    ids = prompt_ids(24, seed=6)
    want = reference_logits(reference, ids)
    got = engine.logits(ids)
    # fp16 rounding can flip a near-tie in a router, changing that token's experts: per position, the
    # large majority must agree closely, and the next-token choice almost everywhere
    close = ((got - want).abs().amax(-1) <= 1e-2 * want.abs().max()).float().mean()
    assert close >= 0.8
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_dtype_option_overrides_checkpoint_dtype(tiny_bf16):
    folder, _ = tiny_bf16
    engine = moe_local.load(folder, device="cpu", dtype="fp32")
    assert engine.dtype == torch.float32
    ids = prompt_ids(16)
    want = reference_logits(reference_model(folder, torch.float32), ids)
    assert (engine.logits(ids) - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("fixture", ["tiny", "tiny_sharded"])
def test_greedy_tokens_match_transformers_for_32_new_tokens(fixture, request, device):
    folder, reference = request.getfixturevalue(fixture)
    ids = prompt_ids(12, seed=3)
    want = reference_greedy(reference, ids, 32)
    assert len(want) == 32
    assert greedy(moe_local.load(folder, device=device, expert_slots=3), ids, 32) == want


@pytest.mark.parametrize("slots", [1, 3, 12, 24])
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", POLICIES)
def test_outputs_do_not_depend_on_cache_size_policy_or_prefetch(tiny_bf16, slots, prefetch, policy, device):
    """Bit-identical logits and tokens whatever the pool size, policy, prefetch, and with every expert resident."""
    folder, _ = tiny_bf16
    ids = prompt_ids(40, seed=5)
    resident = moe_local.load(folder, device=device, expert_slots=24)
    resident.experts = ResidentExperts(resident.store, resident.device)
    engine = moe_local.load(folder, device=device, expert_slots=slots, prefetch=prefetch, policy=policy)
    assert torch.equal(engine.logits(ids), resident.logits(ids))
    assert greedy(engine, ids[:6], 24) == greedy(resident, ids[:6], 24)


def test_step_by_step_decode_agrees_with_one_full_prefill(tiny, device):
    """The KV cache, RoPE positions, masking and chunked prefill all at once (mistral-inference's test)."""
    folder, _ = tiny
    engine = moe_local.load(folder, device=device, expert_slots=5, prefill_chunk=7)
    prompt = prompt_ids(17, seed=7)
    logits, evaluated = engine.prefill(prompt)
    assert evaluated == 17
    steps, tokens = [logits], []
    for _ in range(20):
        tokens.append(int(steps[-1].argmax()))
        steps.append(engine.decode_one(tokens[-1]))
    full = moe_local.load(folder, device=device, expert_slots=24).logits(prompt + tokens)
    stepped = torch.stack(steps)  # [21, V]: logits after the prompt and after each fed token
    assert (stepped - full[16:]).abs().max() <= 1e-4 * full.abs().max()


def test_one_token_steps_run_without_onednn_and_restore_it(tiny_bf16):
    """bf16 matmuls of one row take torch's own matrix-vector kernel (oneDNN is half as fast there), larger
    steps keep oneDNN, and the process-wide switch is put back after every step, even a failed one."""
    folder, _ = tiny_bf16
    engine = moe_local.load(folder, device="cpu")
    seen, experts = [], engine.experts

    def watching(*args):
        seen.append(torch.backends.mkldnn.enabled)
        return experts(*args)

    engine.experts = watching
    token = int(engine.prefill(prompt_ids(5))[0].argmax())
    assert seen and all(seen)
    seen.clear()
    engine.decode_one(token)
    assert seen and not any(seen)
    assert torch.backends.mkldnn.enabled
    engine.experts = lambda *args: 1 / 0
    with pytest.raises(ZeroDivisionError):
        engine.decode_one(token)
    assert torch.backends.mkldnn.enabled


def test_a_bf16_product_of_many_rows_runs_in_fp32_and_one_of_few_rows_as_before(tiny_bf16, monkeypatch):
    """On a CPU without bf16 arithmetic (this one's AVX-512 without AVX512-BF16) every bf16 `nn.Linear` is a
    `WideLinear` (the same weight): a product of WIDEN_MIN_ROWS rows or more, a prefill's, is the fp32 product of
    the same bf16 numbers rounded once (the weight widened a tile at a time), a decode step's is nn.Linear's own."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=gen).bfloat16() for shape in ((2, 20, 64), (40, 64), (40,)))
    monkeypatch.setattr(cpu_matmul, "WIDEN_TILE_BYTES", 16 * 4 * 64)  # tiles of 16 rows: 40 is three of them
    want = (x.float() @ w.float().T + b.float()).bfloat16()
    torch.testing.assert_close(cpu_matmul.widened_linear(x, w, b), want, rtol=2**-8, atol=0)
    monkeypatch.setattr(cpu_matmul, "widens_bf16", lambda: False)  # a CPU with AVX512-BF16 or AMX keeps oneDNN's bf16
    assert not any(isinstance(m, cpu_matmul.WideLinear) for m in moe_local.load(tiny_bf16[0], device="cpu").model.modules())
    monkeypatch.setattr(cpu_matmul, "widens_bf16", lambda: True)  # as on this machine, whatever the CPU
    engine = moe_local.load(tiny_bf16[0], device="cpu")
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is cpu_matmul.WideLinear for m in linears)
    widened = []
    monkeypatch.setattr(cpu_matmul, "widened_linear", lambda *args: widened.append(args[0].shape[0]) or x.new_zeros(args[0].shape[0], args[1].shape[0]))
    token = int(engine.prefill(prompt_ids(cpu_matmul.WIDEN_MIN_ROWS))[0].argmax())
    assert widened and set(widened) == {cpu_matmul.WIDEN_MIN_ROWS}
    widened.clear()
    engine.decode_one(token)
    assert widened == []


def test_in_place_an_expert_one_token_was_routed_to_runs_without_onednn_in_a_larger_step(tiny_bf16, monkeypatch):
    """--device cpu, a batched step that torch's kernels run (moe-local's grouped expert kernel is off here):
    each expert runs with oneDNN off when one row was routed to it, on when more were, and the switch is
    back on after the step."""
    folder, _ = tiny_bf16
    monkeypatch.setattr(native, "library", lambda: "turned off by the test")
    engine = moe_local.load(folder, device="cpu", sequences=4)
    seqs = [engine.sequence] + [engine.new_sequence() for _ in range(3)]
    tokens = [int(engine.prefill(prompt_ids(4, seed), seq)[0].argmax()) for seed, seq in enumerate(seqs)]
    seen, forward = [], engine.experts.format.forward
    monkeypatch.setattr(engine.experts.format, "forward", lambda x, w: seen.append((x.shape[0], torch.backends.mkldnn.enabled)) or forward(x, w))
    engine.decode_batch(seqs, tokens)
    assert {rows for rows, _ in seen} > {1} and all(enabled == (rows > 1) for rows, enabled in seen), seen
    assert torch.backends.mkldnn.enabled


def test_prefill_reuses_the_cached_prefix(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu")
    first = prompt_ids(20, seed=8)
    engine.prefill(first)
    logits, evaluated = engine.prefill(first + [5, 6, 7])
    assert evaluated == 3
    fresh = moe_local.load(folder, device="cpu").logits(first + [5, 6, 7])[-1]
    assert (logits - fresh).abs().max() <= 1e-4 * fresh.abs().max()
    _, evaluated = engine.prefill(first[:10] + [9, 9])  # diverges after 10 tokens: recompute from there
    assert evaluated == 2


def test_sliding_window_matches_transformers(tmp_path, tokenizer_dir):
    reference = build_mixtral(tmp_path, tokenizer_dir, sliding_window=8, seed=4)
    ids = prompt_ids(30, seed=4)
    want = reference_logits(reference, ids)
    got = moe_local.load(tmp_path, device="cpu").logits(ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # one token at a time: decode steps inside the window need no mask, later ones do
    engine = moe_local.load(tmp_path, device="cpu")
    stepped = torch.stack([engine.prefill(ids[:1])[0], *(engine.decode_one(i) for i in ids[1:])])
    assert (stepped - want).abs().max() <= 1e-4 * want.abs().max()


def test_rope_rotates_as_the_reference_does_bit_for_bit():
    """cat(-x2, x1) * sin (transformers' rotate_half) computed as roll(x) * signed sin."""
    x = torch.randn(4, 5, 16, dtype=torch.bfloat16)
    positions = torch.arange(100, 105)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cos, signed_sin = rope_cos_sin(inv_freq, positions, torch.bfloat16)
    emb = torch.cat([positions[:, None].float() * inv_freq] * 2, dim=-1)
    sin = emb.sin().to(torch.bfloat16)
    assert torch.equal(cos, emb.cos().to(torch.bfloat16))
    assert torch.equal(apply_rope(x, cos, signed_sin), x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin)


def test_same_seed_same_output_and_different_seeds_differ(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    runs = {seed: [list(engine.generate(prompt_ids(5), 24, replace(params, seed=seed))) for _ in range(2)] for seed in (1, 2)}
    assert runs[1][0] == runs[1][1] and runs[2][0] == runs[2][1]
    assert runs[1][0] != runs[2][0]


def test_generation_stops_at_eos_and_at_max_new_tokens(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu")
    ids = prompt_ids(12, seed=3)
    free_run = greedy(engine, ids, 32)
    first_five = free_run[:5]
    stops = [i for i, t in enumerate(first_five) if t in engine.stop_ids]  # the model's own EOS may come early
    assert list(engine.generate(ids, 5, GREEDY)) == first_five[: stops[0] if stops else 5]
    stop = free_run[3]  # pretend the 4th generated token is the end of text: generation ends before it
    stopped = list(generate(engine, ids, 32, GREEDY, {stop}, stats := GenerationStats()))
    assert stopped == free_run[: free_run.index(stop)]
    assert stats.finish_reason == "stop"


def test_generation_stops_when_the_context_is_full(tiny):
    folder, _ = tiny
    engine = moe_local.load(folder, device="cpu", ctx_size=16)
    stats = GenerationStats()
    tokens = list(generate(engine, prompt_ids(10), 100, GREEDY, set(), stats))
    assert len(tokens) == 16 - 10 + 1  # the last one is sampled from the logits at the last position
    assert stats.finish_reason == "context"  # not "length", which max_new_tokens gives
    with pytest.raises(moe_local.MoeLocalError, match="17 tokens do not fit the context of 16"):
        engine.prefill(prompt_ids(17))


def test_loading_reports_progress_up_to_every_expert_byte(tiny):
    folder, _ = tiny
    calls = []
    engine = moe_local.load(folder, device="cpu", progress=lambda done, total: calls.append((done, total)))
    assert len(calls) == engine.cfg.n_layers * engine.cfg.n_experts
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert calls[-1] == (engine.store.total_bytes, engine.store.total_bytes)

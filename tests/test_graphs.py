"""`StaticDecoder` (graphs.py): one-token steps whose resident work per layer has static shapes (the position
on the device, the cache attended whole under a mask) give what the ordinary decode gives, for every
family's pieces; on CUDA the same steps replayed as CUDA graphs (`--cuda-graphs`) do too."""

from __future__ import annotations

import pytest
import torch

import moe_local
from moe_local.errors import ConfigError
from moe_local.graphs import StaticDecoder

from families import VARIANTS, build_variant

RTOL = 1e-5  # relative to the largest logit: the whole masked cache against its prefix rounds differently


def prompt(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, 300, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode(engine, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and each step's logits [steps, V] after a prefill of `ids`."""
    engine.tokens = []
    logits, _ = engine.prefill(ids)
    tokens, rows = [], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = engine.decode_one(tokens[-1])
        rows.append(logits)
    return tokens, torch.stack(rows)


@pytest.mark.parametrize("variant", ["mixtral-window", *VARIANTS])
def test_static_steps_match_the_ordinary_decode(variant, tmp_path, tokenizer_dir):
    """Sliding rings (a window of 6, passed by the 9-token prompt and 12 steps), sinks, latent attention,
    dense layers and shared experts, through slots (5) with prefetch."""
    build_variant(variant, tmp_path, tokenizer_dir)
    engine = moe_local.load(tmp_path, device="cpu", expert_slots=5, ctx_size=32)
    want_tokens, want = decode(engine, prompt(9, 3), 12)
    engine.static = StaticDecoder(engine.model, engine.sequence.kv, capture=False)
    got_tokens, got = decode(engine, prompt(9, 3), 12)
    assert (got - want).abs().max() <= RTOL * want.abs().max()
    assert got_tokens == want_tokens


@pytest.mark.parametrize("static", [True, False])  # the static step, or the eager one (in bf16, the fused attention block's)
def test_a_full_context_is_an_error_not_a_write_past_the_cache(tiny, static):
    engine = moe_local.load(tiny[0], device="cpu", ctx_size=8, dtype="bf16")
    if static:
        engine.static = StaticDecoder(engine.model, engine.sequence.kv, capture=False)
    engine.prefill(prompt(8, 0))
    with pytest.raises(moe_local.MoeLocalError, match="context of 8 tokens is full"):
        engine.decode_one(5)


def test_cuda_graphs_need_cuda_and_are_off_by_default_on_the_cpu(tiny):
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device"):
        moe_local.load(tiny[0], device="cpu", cuda_graphs=True)
    assert moe_local.load(tiny[0], device="cpu").static is None


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mixtral-window", "gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_cuda_graph_steps_match_the_ordinary_decode(variant, tmp_path, tokenizer_dir):
    build_variant(variant, tmp_path, tokenizer_dir)
    want_tokens, want = decode(moe_local.load(tmp_path, device="cuda", expert_slots=5, ctx_size=32, cuda_graphs=False), prompt(9, 3), 12)
    got_tokens, got = decode(moe_local.load(tmp_path, device="cuda", expert_slots=5, ctx_size=32, cuda_graphs=True), prompt(9, 3), 12)
    assert (got - want).abs().max() <= RTOL * want.abs().max()
    assert got_tokens == want_tokens

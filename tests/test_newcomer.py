"""What a newcomer trips over (issue 14): fast failures before the slow load, messages for a person,
quiet pipes, context limits said out loud, the options llama.cpp and Ollama users expect."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moe_local
from moe_local.errors import MoeLocalError
from moe_local.generate import GenerationStats, SamplingParams, generate, sample


def test_the_tests_quantized_cache_lives_in_pytests_temporary_folder(tmp_path_factory):
    cache = Path(os.environ["MOE_LOCAL_CACHE"])
    assert cache.is_dir() and cache.is_relative_to(tmp_path_factory.getbasetemp())


def test_a_seed_out_of_range_is_a_message_not_an_overflow():
    with pytest.raises(ValueError, match=r"seed must be a whole number from 0 to 18446744073709551615"):
        SamplingParams(seed=99999999999999999999999)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_or_inf_logits_say_the_weights_may_be_damaged(bad, temperature):
    logits = torch.tensor([0.5, bad, 1.0])
    with pytest.raises(MoeLocalError, match="NaN or infinite logits: its weights may be damaged"):
        sample(logits, [], SamplingParams(temperature=temperature), torch.Generator().manual_seed(0))


def test_an_unseeded_generation_reports_a_seed_that_repeats_it(tiny):
    engine = moe_local.load(tiny[0], device="cpu")
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    first = GenerationStats()
    tokens = list(engine.generate([1, 5, 9], 12, params, first))
    assert first.seed is not None and first.as_dict()["seed"] == first.seed
    again = GenerationStats()
    assert list(engine.generate([1, 5, 9], 12, replace(params, seed=first.seed), again)) == tokens
    assert again.seed == first.seed


def test_a_full_context_is_its_own_finish_reason(tiny):
    engine = moe_local.load(tiny[0], device="cpu", ctx_size=16)
    stats = GenerationStats()
    tokens = list(generate(engine, list(range(1, 11)), 100, SamplingParams(temperature=0), set(), stats))
    assert len(tokens) == 16 - 10 + 1 and stats.finish_reason == "context"
    stats = GenerationStats()
    list(generate(engine, list(range(1, 11)), 3, SamplingParams(temperature=0), set(), stats))
    assert stats.finish_reason == "length"

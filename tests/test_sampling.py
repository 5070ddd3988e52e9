"""Sampling: each filter on its own, the repetition penalty, and defaults from generation_config.json."""

from __future__ import annotations

import pytest
import torch

from moe_local.generate import SamplingParams, apply_repeat_penalty, logits_to_probs, sample

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
OFF = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def probs(**params) -> torch.Tensor:
    return logits_to_probs(LOGITS, SamplingParams(**{**OFF, **params}))


def test_no_filters_keep_the_distribution():
    assert torch.allclose(probs(), torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]), atol=1e-6)


def test_top_k_keeps_the_k_likeliest():
    p = probs(top_k=2)
    assert torch.allclose(p, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert (probs(top_p=0.7) > 0).tolist() == [True, True, False, False, False]
    assert (probs(top_p=0.75) > 0).tolist() == [True, True, False, False, False]
    assert (probs(top_p=0.76) > 0).tolist() == [True, True, True, False, False]
    assert (probs(top_p=0.01) > 0).tolist() == [True, False, False, False, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    assert (probs(min_p=0.2) > 0).tolist() == [True, True, True, False, False]


def test_temperature_sharpens_and_flattens():
    assert probs(temperature=0.5)[0] > probs()[0] > probs(temperature=2.0)[0]


def test_repeat_penalty_follows_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, [0, 1], SamplingParams(repeat_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert apply_repeat_penalty(logits, [0, 1], SamplingParams(repeat_penalty=2.0, repeat_last_n=1)).tolist() == [2.0, -4.0, 1.0]


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = torch.tensor([3.0, 2.9, 0.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, [], SamplingParams(temperature=0), gen) == 0
    assert sample(logits, [0], SamplingParams(temperature=0, repeat_penalty=1.5), gen) == 1


def test_sampling_follows_the_seed():
    draws = [[sample(LOGITS, [], SamplingParams(**OFF), torch.Generator().manual_seed(s)) for _ in range(1)] for s in range(40)]
    again = [[sample(LOGITS, [], SamplingParams(**OFF), torch.Generator().manual_seed(s)) for _ in range(1)] for s in range(40)]
    assert draws == again
    assert len({d[0] for d in draws}) > 1


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0), dict(repeat_penalty=0.0)],
)
def test_out_of_range_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_generation_config_sets_the_defaults():
    params = SamplingParams().from_generation_config({"temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1})
    assert (params.temperature, params.top_p, params.top_k, params.repeat_penalty) == (0.6, 0.9, 50, 1.1)
    assert SamplingParams().from_generation_config({"do_sample": False, "temperature": 0.6}).temperature == 0.0
    assert SamplingParams().from_generation_config({}) == SamplingParams()

"""Sampler: exact processor arithmetic, and draw frequencies against the distribution each setting defines.

Draws are vectorised: one call on N identical rows gives N independent samples, so the statistics are cheap.
"""

import math

import pytest
import torch

from kimi_lm.sample import Sampler, SamplingParams

N = 40_000
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def _freq(params: SamplingParams, logits=LOGITS) -> torch.Tensor:
    tokens, _ = Sampler(params)(logits.expand(N, -1))
    return torch.bincount(tokens, minlength=logits.numel()).float() / N


def _close(freq, probs):
    # 5 standard deviations of a binomial proportion: fails only if the distribution is wrong
    tol = 5 * (probs * (1 - probs) / N).sqrt() + 1e-9
    return bool(((freq - probs).abs() <= tol).all())


def test_greedy_is_argmax_per_row():
    logits = torch.randn(5, 100)
    tokens, logprobs = Sampler()(logits)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(logprobs, logits.log_softmax(-1))


def test_temperature_follows_the_scaled_softmax():
    for t in (0.5, 1.0, 2.0):
        assert _close(_freq(SamplingParams(temperature=t, seed=1)), (LOGITS / t).softmax(-1))


def test_top_k_renormalises_over_the_k_likeliest():
    probs = LOGITS.softmax(-1)
    want = torch.zeros_like(probs)
    want[:3] = probs[:3] / probs[:3].sum()
    freq = _freq(SamplingParams(temperature=1.0, top_k=3, seed=2))
    assert _close(freq, want) and freq[3:].sum() == 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)  # 0.33, 0.20, 0.12, 0.07, ...: the first three hold 0.65
    p = float(probs[:3].sum()) - 0.01
    want = torch.zeros_like(probs)
    want[:3] = probs[:3] / probs[:3].sum()
    freq = _freq(SamplingParams(temperature=1.0, top_p=p, seed=3))
    assert _close(freq, want) and freq[3:].sum() == 0


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = LOGITS.softmax(-1)
    keep = probs >= 0.3 * probs.max()
    want = torch.where(keep, probs, 0) / probs[keep].sum()
    freq = _freq(SamplingParams(temperature=1.0, min_p=0.3, seed=4))
    assert keep.sum() == 3 and _close(freq, want) and freq[~keep].sum() == 0


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(64, 1000)
    a, _ = Sampler(SamplingParams(temperature=1.0, seed=7))(logits)
    b, _ = Sampler(SamplingParams(temperature=1.0, seed=7))(logits)
    c, _ = Sampler(SamplingParams(temperature=1.0, seed=8))(logits)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_repetition_penalty_divides_positive_and_multiplies_negative_within_the_window():
    logits = torch.tensor([[2.0, -2.0, 1.0, 4.0]])
    history = torch.tensor([[3, 0, 1, 1]])  # token 3 falls outside a window of 3
    out = Sampler(SamplingParams(repetition_penalty=2.0, repetition_context_size=3)).process(logits, history)
    assert out.tolist() == [[1.0, -4.0, 1.0, 4.0]]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 4)
    history = torch.tensor([[1, 1, 1, 2]])
    out = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)).process(logits, history)
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0]]


def test_penalties_are_per_row_of_the_batch():
    logits = torch.ones(2, 3)
    history = torch.tensor([[0, 0], [2, 2]])
    out = Sampler(SamplingParams(repetition_penalty=4.0)).process(logits, history)
    assert out.tolist() == [[0.25, 1.0, 1.0], [1.0, 1.0, 0.25]]


def test_logit_bias_adds_and_can_force_a_token():
    out = Sampler(SamplingParams(logit_bias={1: 1.5, 3: -1.0})).process(torch.zeros(2, 4))
    assert out.tolist() == [[0.0, 1.5, 0.0, -1.0]] * 2
    tokens, _ = Sampler(SamplingParams(temperature=1.0, logit_bias={5: 100.0}, seed=0))(LOGITS.expand(100, -1))
    assert (tokens == 5).all()


def test_logprobs_are_of_the_processed_distribution():
    logits = torch.randn(1, 10)
    history = torch.tensor([[4]])
    sampler = Sampler(SamplingParams(temperature=0.7, repetition_penalty=1.3, seed=0))
    _, logprobs = sampler(logits, history)
    assert torch.allclose(logprobs, sampler.process(logits, history).log_softmax(-1))
    assert math.isclose(float(logprobs.exp().sum()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                          ("min_p", 2.0), ("repetition_penalty", 0.0)])
def test_out_of_range_parameters_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        Sampler(SamplingParams(**{field: value}))

"""Sampling: masks on crafted logits, seeds, and greedy equivalences."""

from __future__ import annotations

import math

import pytest
import torch

from kubellm.runtime import SamplingParams
from kubellm.runtime.core.sampler import Sampler, _apply_penalties, filtered_probs
from kubellm.runtime.core.sequence import Sequence


def req(prompt=(1, 2, 3), outputs=(), seed=None, eos=(), **params) -> Sequence:
    r = Sequence("r", list(prompt), SamplingParams(**params), frozenset(eos), 4096, seed)
    r.token_ids.extend(outputs)
    return r


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    probs = filtered_probs(logits, [req(top_k=2).params])
    assert (probs[0] > 0).tolist() == [False, True, True, False, False]
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)


def test_top_k_larger_than_the_vocab_keeps_everything_beside_a_small_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]] * 2)
    probs = filtered_probs(logits, [req(top_k=2).params, req(top_k=10**6).params])
    assert (probs[0] > 0).sum() == 2 and bool((probs[1] > 0).all())


def test_any_integer_is_a_seed():
    for seed in (-1, 2**64 + 5, -(2**70)):
        assert req(seed=seed).generator is not None


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = filtered_probs(probs_in.log(), [req(top_p=0.7).params])
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    assert torch.allclose(probs[0, :2], torch.tensor([0.625, 0.375]))


def test_top_p_always_keeps_the_most_likely_token():
    probs = filtered_probs(torch.tensor([[0.9, 0.1]]).log(), [req(top_p=0.01).params])
    assert probs[0].tolist() == [1.0, 0.0]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs_in = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    probs = filtered_probs(probs_in.log(), [req(min_p=0.2).params])  # threshold 0.12
    assert (probs[0] > 0).tolist() == [True, True, False, False]


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0]])
    cold = filtered_probs(logits, [req(temperature=0.5).params])[0, 0]
    hot = filtered_probs(logits, [req(temperature=2.0).params])[0, 0]
    assert cold > torch.softmax(logits, -1)[0, 0] > hot


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    sampler = Sampler(seed=0)
    r = req(prompt=(0,), outputs=(1,), repetition_penalty=2.0, temperature=0.0)
    _apply_penalties(logits, [r])
    assert logits[0].tolist() == [1.0, -4.0, 2.0, -2.0]
    assert sampler(torch.tensor([[2.0, -2.0, 1.9, -2.0]]), [r]).token_ids == [2]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    r = req(prompt=(3, 3), outputs=(1, 1, 2), presence_penalty=0.5, frequency_penalty=0.25)
    _apply_penalties(logits, [r])
    assert logits[0].tolist() == [0.0, -1.0, -0.75, 0.0]


def test_min_tokens_masks_stop_tokens_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0]])  # token 2 (eos) is the favourite
    sampler = Sampler(seed=0)
    early = req(eos=(2,), outputs=(0,), min_tokens=2, temperature=0.0)
    late = req(eos=(2,), outputs=(0, 0), min_tokens=2, temperature=0.0)
    assert sampler(logits.expand(2, -1), [early, late]).token_ids == [0, 2]


def test_same_seed_same_draws_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, 500)
    draws = []
    for batch_size in (1, 5):
        sampler = Sampler(seed=batch_size)  # a different engine seed must not matter
        seeded = req(seed=1234, temperature=1.0)
        others = [req(temperature=1.0) for _ in range(batch_size - 1)]
        tokens = []
        for _ in range(20):
            batch = [*others, seeded]
            tokens.append(sampler(logits.expand(len(batch), -1), batch).token_ids[-1])
        draws.append(tokens)
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_unseeded_draws_in_one_batch_are_independent_and_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    rows = 4000
    requests = [req(temperature=1.0) for _ in range(rows)]
    tokens = Sampler(seed=0)(probs.log().expand(rows, -1), requests).token_ids
    frequencies = torch.bincount(torch.tensor(tokens), minlength=3) / rows
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)


def test_logit_bias_moves_only_its_own_row():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    requests = [
        req(temperature=0.0, logit_bias={0: -100}),
        req(temperature=0.0),
        req(temperature=0.0, logit_bias={2: 2.5}),
    ]
    out = Sampler(seed=0)(logits, requests)
    assert out.token_ids == [1, 0, 2]


def test_top_k_1_equals_greedy():
    torch.manual_seed(1)
    logits = torch.randn(8, 300)
    sampler = Sampler(seed=0)
    greedy = sampler(logits, [req(temperature=0.0) for _ in range(8)]).token_ids
    top1 = sampler(logits, [req(temperature=1.3, top_k=1) for _ in range(8)]).token_ids
    assert greedy == top1 == logits.argmax(-1).tolist()


def test_logprobs_are_of_the_raw_distribution_with_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = Sampler(seed=0)(logits, [req(temperature=0.0, logprobs=2, top_k=1)])
    lp = out.logprobs[0]
    raw = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 1 and math.isclose(lp.logprob, float(raw[1]), rel_tol=1e-6)
    assert list(lp.top) == [1, 2]


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(temperature=2.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=1.5),
        dict(max_tokens=0),
        dict(max_tokens=-3),
        dict(n=0),
        dict(presence_penalty=3.0),
        dict(frequency_penalty=-2.5),
        dict(logit_bias={3: 150.0}),
        dict(logit_bias={-1: 1.0}),
        dict(repetition_penalty=0.0),
        dict(stop=[""]),
        dict(logprobs=21),
        dict(top_k=-2),
        dict(min_tokens=5, max_tokens=2),
    ],
)
def test_bad_sampling_params_are_refused_with_the_field_named(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)

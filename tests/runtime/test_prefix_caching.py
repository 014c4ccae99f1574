"""A shared prefix is computed once; reusing it changes no output."""

from __future__ import annotations

import pytest

from kubellm.runtime import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.mark.slow
def test_second_request_computes_only_its_new_tokens(smollm2):
    engine = smollm2.engine
    tokenizer = smollm2.tokenizer
    prefix = tokenizer.encode(
        "You are kubellm's test assistant #4711. Answer briefly and precisely. " * 8
    )[:64]
    first = prefix + tokenizer.encode(" Question: what colour is the sky?")
    second = prefix + tokenizer.encode(" Question: name a prime number.")

    second_cold = smollm2.generate([second], GREEDY)[0]
    assert second_cold.num_cached_tokens == 0
    smollm2.generate([first], GREEDY)  # caches the prefix (again)

    hits_before, computed_before = engine.kv.prefix_hits, engine.scheduler.num_computed_tokens
    one_token = SamplingParams(temperature=0.0, max_tokens=1)
    warm = smollm2.generate([second], one_token)[0]
    assert warm.num_cached_tokens >= 64
    assert engine.kv.prefix_hits - hits_before == warm.num_cached_tokens
    assert (
        engine.scheduler.num_computed_tokens - computed_before
        == len(second) - warm.num_cached_tokens
    )

    third = prefix + tokenizer.encode(" Question: what is two plus two?")
    computed_before = engine.scheduler.num_computed_tokens
    out = smollm2.generate([third], one_token)[0]
    assert out.num_cached_tokens == 64
    assert engine.scheduler.num_computed_tokens - computed_before == len(third) - 64

    second_warm = smollm2.generate([second], GREEDY)[0]
    assert second_warm.num_cached_tokens > 0
    assert second_warm.outputs[0].token_ids == second_cold.outputs[0].token_ids


@pytest.mark.slow
def test_n_sequences_are_separate_draws_and_free_their_blocks(smollm2):
    params = SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=8)
    out = smollm2.generate(["Tell me a story about a brave little toaster."], params)[0]
    assert len(out.outputs) == 4 and [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds, different draws
    assert smollm2.engine.kv.num_free_blocks == smollm2.engine.kv.num_blocks

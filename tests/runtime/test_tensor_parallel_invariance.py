"""Random engine workloads give the same tokens and logprobs over two ranks as over one:
arrivals, aborts, preemption (a small pool), prefix hits, n > 1, prompt logprobs and
seeded sampling. Both engines live for the whole module (one tensor-parallel engine per
process) and run every example side by side."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubellm.runtime import EngineConfig, LLMEngine

from .invariants import ENGINE_SETTINGS
from .workloads import run_workload, workload


@pytest.fixture(scope="module", params=ENGINE_SETTINGS)
def single_and_split(request, model_for):
    """Under the suite's pins and under the defaults (a 4-bit checkpoint)."""
    directory, settings = model_for(request.param, "gqa3-llama3-rope")
    config = dict(model=directory, max_model_len=128, num_kv_blocks=14, max_num_seqs=6)
    single = LLMEngine(EngineConfig(**settings, **config))
    split = LLMEngine(EngineConfig(**settings, **config, tensor_parallel_size=2))
    yield request.param, single, split
    split.shutdown()


# Two ranks add a row-parallel product's halves in another order than one rank; with the
# defaults' int8-rounded activations such a difference can move an input across a
# rounding step of the next product (these examples: at most 2.2e-3 apart). Tokens must
# match exactly either way.
LOGPROB_TOLERANCE = {"pinned": 1e-4, "defaults": 5e-3}


@settings(max_examples=20, deadline=None, derandomize=True)
@given(requests=workload, budget=st.integers(1, 64))
def test_two_ranks_give_the_tokens_and_logprobs_of_one(single_and_split, requests, budget):
    engine_settings, single, split = single_and_split
    tolerance = LOGPROB_TOLERANCE[engine_settings]
    for engine in (single, split):
        engine.scheduler.max_num_batched_tokens = budget
    expected = run_workload(single, requests)
    got = run_workload(split, requests)
    # the same schedule: rank 0 alone decides it, whatever the number of ranks
    assert split.scheduler.num_preemptions == single.scheduler.num_preemptions
    for want, have in zip(expected, got):
        assert have.num_cached_tokens == want.num_cached_tokens
        for a, b in zip(want.outputs, have.outputs):
            assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
            for x, y in zip(a.logprobs or [], b.logprobs or []):
                assert y.logprob == pytest.approx(x.logprob, abs=tolerance)
        for x, y in zip(want.prompt_logprobs or [], have.prompt_logprobs or []):
            if x is not None:
                assert y.logprob == pytest.approx(x.logprob, abs=tolerance)


# Five 60-token prompts (length 100 in `workload`'s terms: 40 of them would be the shared
# prefix), 10 tokens each, arriving together: three fit the pool's 14 blocks at first,
# and growing past 64 tokens preempts one of them.
PREEMPTING = [(100, 10, 0, None, False, 1, False, False)] * 5


def test_two_ranks_agree_through_preemption(single_and_split):
    _, single, split = single_and_split
    preempted = single.scheduler.num_preemptions
    for engine in (single, split):
        engine.scheduler.max_num_batched_tokens = 512
    expected, got = run_workload(single, PREEMPTING), run_workload(split, PREEMPTING)
    assert single.scheduler.num_preemptions > preempted
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]

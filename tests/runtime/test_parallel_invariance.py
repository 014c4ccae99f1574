"""Random engine workloads give the same tokens and logprobs over two ranks as over one,
whether the two are tensor-parallel shards or pipeline stages: arrivals, aborts,
preemption (a small pool), prefix hits, n > 1, prompt logprobs and seeded sampling. Each
pair of engines lives while its tests run (one multi-rank engine per process) and runs
every example side by side."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubellm.runtime import EngineConfig, LLMEngine

from .invariants import ENGINE_SETTINGS
from .workloads import run_workload, workload

SPLITS = {"tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2}}


@pytest.fixture(scope="module", params=[(s, split) for split in SPLITS for s in ENGINE_SETTINGS])
def single_and_split(request, model_for):
    """Under the suite's pins and under the defaults (a 4-bit checkpoint); split over two
    tensor-parallel ranks or two pipeline stages."""
    engine_settings, split_name = request.param
    directory, settings = model_for(engine_settings, "gqa3-llama3-rope")
    config = dict(model=directory, max_model_len=128, num_kv_blocks=14, max_num_seqs=6)
    single = LLMEngine(EngineConfig(**settings, **config))
    split = LLMEngine(EngineConfig(**settings, **config, **SPLITS[split_name]))
    yield request.param, single, split
    split.shutdown()


# Two tensor-parallel ranks add a row-parallel product's halves in another order than
# one rank; with the defaults' int8-rounded activations such a difference can move an
# input across a rounding step of the next product (these examples: at most 2.2e-3
# apart). A pipeline stage's worker runs its layers on its share of the cores (one
# thread here), and torch's fp32 kernels round differently on another thread count (one
# engine on one thread against two: 1.9e-6 apart). Tokens must match exactly either way.
LOGPROB_TOLERANCE = {"pinned": 1e-4, "defaults": 5e-3}


@settings(max_examples=20, deadline=None, derandomize=True)
@given(requests=workload, budget=st.integers(1, 64))
def test_two_ranks_give_the_tokens_and_logprobs_of_one(single_and_split, requests, budget):
    (engine_settings, split_name), single, split = single_and_split
    tolerance = LOGPROB_TOLERANCE[engine_settings]
    for engine in (single, split):
        engine.scheduler.max_num_batched_tokens = budget
    expected = run_workload(single, requests)
    got = run_workload(split, requests)
    same_schedule = split_name == "tp2"  # rank 0 alone decides it; two stages run two
    # batches at once, so a sequence waits for its batch and the steps differ (the
    # preemptions and prefix hits with them, and how far an abort at step k finds a
    # sequence), but not the tokens any sequence gets
    if same_schedule:
        assert split.scheduler.num_preemptions == single.scheduler.num_preemptions
    for want, have in zip(expected, got):
        if same_schedule:
            assert have.num_cached_tokens == want.num_cached_tokens
        for a, b in zip(want.outputs, have.outputs):
            if same_schedule or "abort" not in (a.finish_reason, b.finish_reason):
                assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
            else:  # aborted in either: the shorter reply begins the longer
                shorter = min(len(a.token_ids), len(b.token_ids))
                assert a.token_ids[:shorter] == b.token_ids[:shorter]
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

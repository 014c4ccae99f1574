"""The profiling pass that sets the activations aside before the KV pool is sized."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.core.scheduler import ScheduledSequence, SchedulerOutput
from kubellm.runtime.core.sequence import Sequence
from kubellm.runtime.executor.step_plan import StepPlan, cdiv

from .pins import pinned


@pytest.mark.parametrize(("tokens", "seqs", "block"), [(300, 16, 16), (300, 500, 16), (7, 3, 4)])
def test_the_profile_plan_is_what_the_scheduler_plans_for_the_largest_step(tokens, seqs, block):
    """`num_tokens` prompt tokens over min(seqs, tokens) requests that each sample, their
    blocks consecutive: the plan the scheduler would make for those requests."""
    plan, num_blocks = StepPlan.for_profile(tokens, seqs, block)
    count = min(tokens, seqs)
    lengths = [tokens // count + (i < tokens % count) for i in range(count)]
    scheduled, next_block = [], 0
    for i, length in enumerate(lengths):
        request = Sequence(f"p{i}", [0] * length, SamplingParams(max_tokens=1), frozenset(), 4096)
        request.block_ids = list(range(next_block, next_block + cdiv(length, block)))
        next_block += len(request.block_ids)
        scheduled.append(ScheduledSequence(request, length))
    expected = SchedulerOutput(scheduled).plan(block)
    assert num_blocks == next_block
    for field in dataclasses.fields(StepPlan):
        got, want = getattr(plan, field.name), getattr(expected, field.name)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want), field.name
        else:
            assert got == want, field.name


def test_the_largest_step_runs_on_a_throwaway_cache(tiny_model_dir):
    llm = LLM(
        **pinned(model=str(tiny_model_dir("gqa4-untied")), max_model_len=512, num_kv_blocks=40)
    )
    runner, vocab = llm.engine.runner, llm.engine.model_config.vocab_size
    pool = runner.kv_caches
    for num_seqs, drawn in ((16, 16), (500, 300)):  # more sequences than tokens: 1 token each
        tokens = runner.profile_step(300, num_seqs)  # 300 tokens need 40+ blocks
        assert len(tokens) == drawn and all(0 <= t < vocab for t in tokens)
    assert runner.kv_caches is pool  # the real pool is back


@pytest.mark.cuda
def test_the_pool_leaves_room_for_the_largest_step():
    llm = LLM(
        **pinned(
            device="cuda", dtype="bfloat16", max_num_batched_tokens=4096, gpu_memory_utilization=0.5
        )
    )
    runner = llm.engine.runner
    assert runner.dtype == torch.bfloat16
    one_row = runner.activation_peak_bytes(4096, 1)
    many_rows = runner.activation_peak_bytes(4096, 256)
    assert many_rows > one_row > 0  # 256 sampled rows: logits and the sampler's sort count
    out = llm.generate([[5] * 4000], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2  # the biggest prefill fits beside the pool

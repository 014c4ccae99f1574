"""The profiling pass that sets the activations aside before the KV pool is sized."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.memory_profile import activation_peak_bytes, run_profile_step


def test_the_largest_step_runs_on_a_throwaway_cache(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir("gqa4-untied")), max_model_len=512, num_kv_blocks=40)
    runner, vocab = llm.engine.runner, llm.engine.model_config.vocab_size
    pool = runner.kv_caches
    for num_seqs, drawn in ((16, 16), (500, 300)):  # more sequences than tokens: 1 token each
        tokens = run_profile_step(runner, 300, num_seqs)  # 300 tokens need 40+ blocks
        assert len(tokens) == drawn and all(0 <= t < vocab for t in tokens)
    assert runner.kv_caches is pool  # the real pool is back


@pytest.mark.cuda
def test_the_pool_leaves_room_for_the_largest_step():
    llm = LLM(
        device="cuda", dtype="bfloat16", max_num_batched_tokens=4096, gpu_memory_utilization=0.5
    )
    runner = llm.engine.runner
    assert runner.dtype == torch.bfloat16
    one_row = activation_peak_bytes(runner, 4096, 1)
    many_rows = activation_peak_bytes(runner, 4096, 256)
    assert many_rows > one_row > 0  # 256 sampled rows: logits and the sampler's sort count
    out = llm.generate([[5] * 4000], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2  # the biggest prefill fits beside the pool

"""The profiling pass that sets the activations aside before the KV pool is sized."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.memory_profile import activation_peak_bytes, profile_batch, run_profile_step
from kubellm.runtime.model.source import resolve
from kubellm.runtime.model.weights import load_weights
from kubellm.runtime.model_runner import ModelRunner


def test_the_largest_step_runs_on_a_throwaway_cache(tiny_model_dir):
    source = resolve(str(tiny_model_dir("gqa4-untied")))
    model = ModelRunner.build(source.config, 512, "torch", torch.device("cpu"), torch.float32)
    load_weights(model, source.tensors())
    vocab = source.config.vocab_size
    for num_seqs, drawn in ((16, 16), (500, 300)):  # more sequences than tokens: 1 token each
        batch = profile_batch(model, 300, num_seqs, 16, torch.device("cpu"), torch.float32)
        tokens = run_profile_step(*batch)
        assert len(tokens) == drawn and all(0 <= t < vocab for t in tokens)


@pytest.mark.cuda
def test_the_pool_leaves_room_for_the_largest_step():
    llm = LLM(device="cuda", max_num_batched_tokens=4096, gpu_memory_utilization=0.5)
    model, device = llm.engine.runner.model, torch.device("cuda")
    one_row = activation_peak_bytes(model, 4096, 1, 16, device, torch.bfloat16)
    many_rows = activation_peak_bytes(model, 4096, 256, 16, device, torch.bfloat16)
    assert many_rows > one_row > 0  # 256 sampled rows: logits and the sampler's sort count
    out = llm.generate([[5] * 4000], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2  # the biggest prefill fits beside the pool

"""The profiling pass that sets the activations aside before the KV pool is sized."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.memory_profile import activation_peak_bytes, dummy_step
from kubellm.runtime.model.source import resolve
from kubellm.runtime.model.weights import load_weights
from kubellm.runtime.model_runner import ModelRunner


def test_the_largest_step_runs_on_a_throwaway_cache(tiny_model_dir):
    source = resolve(str(tiny_model_dir("gqa4-untied")))
    model = ModelRunner.build(source.config, 512, "torch", torch.device("cpu"), torch.float32)
    load_weights(model, source.tensors())
    logits = dummy_step(model, 300, 16, torch.device("cpu"), torch.float32)
    assert logits.shape == (1, source.config.vocab_size) and bool(torch.isfinite(logits).all())


@pytest.mark.cuda
def test_the_pool_leaves_room_for_the_largest_step():
    llm = LLM(device="cuda", max_num_batched_tokens=4096, gpu_memory_utilization=0.5)
    model, device = llm.engine.runner.model, torch.device("cuda")
    assert activation_peak_bytes(model, 4096, 16, device, torch.bfloat16) > 0
    out = llm.generate([[5] * 4000], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2  # the biggest prefill fits beside the pool

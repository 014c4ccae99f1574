"""Decode steps of the default CPU path run each layer in one C call (`x86_layer`), with
the values of the layer's modules run one by one, bit for bit; layers that cannot be fused
(another attention backend) run their modules."""

from __future__ import annotations

import pytest
import torch

from kubellm.kernels import cpu_layer, cpu_library
from kubellm.runtime import LLM, SamplingParams

from .pins import defaults

pytestmark = pytest.mark.skipif(
    cpu_library.unavailable() is not None, reason="needs AVX2, FMA, F16C and a C compiler"
)

PROMPTS = [[100 + i for i in range(n)] for n in (5, 17, 40, 9)]


def _decode_plan(llm: LLM):
    """A step of the four prompts' replies in which every request decodes."""
    runner, plans = llm.engine.runner, []
    launch = runner.launch
    runner.launch = lambda plan: plans.append(plan) or launch(plan)
    llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    runner.launch = launch
    return next(p for p in plans if len(p.input_ids) == len(PROMPTS))


@pytest.mark.slow
def test_a_decode_step_runs_each_layer_in_one_call_with_the_same_values(monkeypatch):
    with LLM(**defaults(max_model_len=512, kv_cache_memory_gib=0.1)) as llm:
        runner, layers = llm.engine.runner, llm.engine.runner.model.layers
        fused = [layer.whole_decode for layer in layers]
        assert None not in fused
        plan = _decode_plan(llm)
        calls = []
        decode_layer = cpu_layer.decode_layer
        monkeypatch.setattr(
            cpu_layer, "decode_layer", lambda *args: calls.append(1) or decode_layer(*args)
        )
        logits, _ = runner.execute(plan)
        assert len(calls) == len(layers)
        for layer in layers:
            layer.whole_decode = None
        composed, _ = runner.execute(plan)
        assert len(calls) == len(layers)  # the modules ran, one by one
        assert torch.equal(logits, composed)


@pytest.mark.slow
def test_layers_are_not_fused_beside_another_attention_backend():
    with LLM(
        **defaults(max_model_len=512, kv_cache_memory_gib=0.1, attention_backend="torch")
    ) as llm:
        assert all(layer.whole_decode is None for layer in llm.engine.runner.model.layers)

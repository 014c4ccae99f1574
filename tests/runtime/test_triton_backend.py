"""The engine with the Triton backend (the interpreter on CPU) gives the torch backend's
greedy tokens: chunked prefill, a prefix-cache hit, decodes, GQA."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.executor.platform.triton_attention import splits_decode
from tests.helpers import TRITON_DEVICE

from .pins import pinned


@pytest.mark.parametrize("name", ["gqa4-untied", "gqa3-llama3-rope"])
def test_triton_backend_gives_the_torch_backends_tokens(tiny_model_dir, name):
    shared = list(range(40, 60))
    prompts = [[*shared, 7, 8, 9], [11, 12, 13], [*shared, 70, 71]]  # the third hits the cache
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            **pinned(
                model=str(tiny_model_dir(name)),
                attention_backend=backend,
                block_size=16,
                max_num_batched_tokens=16,
                num_kv_blocks=64,
                device=TRITON_DEVICE,
                dtype="float32",
            ),
        )
        first = llm.generate(prompts[:2], params)
        last = llm.generate(prompts[2:], params)
        assert llm.engine.kv.prefix_hits > 0
        outputs[backend] = [o.outputs[0].token_ids for o in first + last]
    assert outputs["triton"] == outputs["torch"]


def test_decodes_split_where_the_gpu_would_be_idle_and_a_context_has_segments():
    assert not splits_decode(num_requests=256, num_kv_heads=8, max_blocks=256, num_sms=132)
    assert splits_decode(num_requests=1, num_kv_heads=8, max_blocks=2048, num_sms=132)
    assert splits_decode(num_requests=8, num_kv_heads=8, max_blocks=17, num_sms=132)
    assert not splits_decode(num_requests=8, num_kv_heads=8, max_blocks=16, num_sms=132)


@pytest.mark.cuda
def test_bf16_on_the_gpu_agrees_with_fp32_on_the_first_tokens():
    llm_bf16 = LLM(
        **pinned(
            device="cuda", dtype="bfloat16", attention_backend="triton", gpu_memory_utilization=0.3
        )
    )
    llm_fp32 = LLM(
        **pinned(
            device="cuda", dtype="float32", attention_backend="torch", gpu_memory_utilization=0.6
        )
    )  # both engines live at once
    params = SamplingParams(temperature=0.0, max_tokens=4)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    bf16 = [o.outputs[0].token_ids[0] for o in llm_bf16.generate(prompts, params)]
    fp32 = [o.outputs[0].token_ids[0] for o in llm_fp32.generate(prompts, params)]
    assert bf16 == fp32
    assert torch.cuda.is_available()

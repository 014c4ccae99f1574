"""A greedy request's tokens do not depend on what else is scheduled with it."""

from __future__ import annotations

import pytest

from kubellm.runtime import LLM, SamplingParams
from tests.runtime.invariants import ENGINE_SETTINGS

from .pins import assert_on_the_default_cpu_path, defaults

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
QUESTIONS = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(16)]


def prompts_for_batch(count: int) -> list[list[int]]:
    """Varied lengths; every third prompt shares a 40-token prefix with the first."""
    shared = [(11 * j) % 3000 + 200 for j in range(40)]
    out = []
    for i in range(count):
        tail = [(37 * i + 5 * j) % 3000 + 200 for j in range(3 + (i * 13) % 50)]
        out.append(shared + tail if i % 3 == 0 else tail)
    return out


VARIANTS = {
    "batch-of-16": {},
    "forced-preemption": {"num_kv_blocks": 14, "max_model_len": 128},
    "prefill-chunk-7": {"max_num_batched_tokens": 7},
    "no-prefix-caching": {"enable_prefix_caching": False},
    "one-seq-at-a-time": {"max_num_seqs": 1},
}


@pytest.fixture(scope="module", params=ENGINE_SETTINGS)
def reference(request, model_for):
    """Each prompt run alone, under the suite's pins and under the defaults."""
    directory, settings = model_for(request.param, "gqa4-untied")
    llm = LLM(**settings, model=directory, kv_cache_memory_gib=0.01)
    tokens = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts_for_batch(16)]
    return request.param, tokens


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokens_match_the_request_run_alone(variant, model_for, reference):
    settings, alone = reference
    directory, engine_settings = model_for(settings, "gqa4-untied")
    llm = LLM(**engine_settings, model=directory, kv_cache_memory_gib=0.01, **VARIANTS[variant])
    outputs = llm.generate(prompts_for_batch(16), GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == alone
    if variant == "forced-preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    if variant == "prefill-chunk-7":
        assert llm.engine.config.max_num_batched_tokens == 7
    if variant == "no-prefix-caching":
        assert llm.engine.kv.prefix_hits == 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.slow
def test_smollm2_alone_equals_inside_a_batch_of_16(smollm2):
    alone = [smollm2.generate(t, GREEDY)[0].outputs[0].token_ids for t in QUESTIONS[:3]]
    batched = smollm2.generate(QUESTIONS, GREEDY)
    assert [o.outputs[0].token_ids for o in batched[:3]] == alone


@pytest.mark.slow
def test_the_default_cpu_path_alone_equals_inside_a_batch_of_16():
    """kubellm's defaults on CPU (the Q4_1 layers and Q8_0 head through kubellm's kernel,
    int8 activations, decode steps a C call per layer): a greedy request's tokens do not
    depend on what shares its steps. Every prompt here is prefilled in one step alone
    and in the batch (whose first step has 16 prompts, over 128 rows), so this holds
    only if every row's products are computed the same way however many rows there are."""
    with LLM(**defaults(max_model_len=512, kv_cache_memory_gib=0.1)) as llm:
        assert_on_the_default_cpu_path(llm)
        alone = [llm.generate(t, GREEDY)[0].outputs[0].token_ids for t in QUESTIONS[:3]]
        batched = llm.generate(QUESTIONS, GREEDY)
    assert [o.outputs[0].token_ids for o in batched[:3]] == alone


@pytest.mark.cuda
@pytest.mark.slow
def test_the_default_cuda_path_alone_equals_inside_a_batch_of_16():
    """kubellm's defaults on a GPU (bf16; the built-in model's 4-bit layers and its head
    through the Triton GEMM, Triton's attention, decode steps as CUDA graphs): a greedy
    request's tokens and logprobs, bit for bit, alone and in a batch of 16 that finds
    their prompts in the prefix cache."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)

    def tokens_and_logprobs(output):
        return output.outputs[0].token_ids, output.outputs[0].logprobs

    with LLM(**defaults(device="cuda", max_model_len=512, gpu_memory_utilization=0.3)) as llm:
        assert llm.engine.runner.decode_graphs is not None
        alone = [tokens_and_logprobs(llm.generate(t, params)[0]) for t in QUESTIONS[:3]]
        hits = llm.engine.kv.prefix_hits
        batched = llm.generate(QUESTIONS, params)
        assert llm.engine.kv.prefix_hits > hits
    assert [tokens_and_logprobs(o) for o in batched[:3]] == alone

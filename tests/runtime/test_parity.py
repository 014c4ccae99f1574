"""Greedy tokens must equal transformers' on the same weights (fp32)."""

from __future__ import annotations

import pytest

from kubellm.runtime import LLM, SamplingParams

from .conftest import TINY_CONFIGS, hf_greedy
from .pins import pinned

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "Translate to French: Good morning, how are you?",
    "1, 2, 3, 4, 5,",
    "Kubernetes is an open-source system for",
    # Longer than one prefill chunk (64 tokens in the session engine):
    "Write a detailed explanation of how continuous batching works in a language model "
    "serving system, why a paged key-value cache reduces memory fragmentation compared with "
    "reserving a contiguous region per request, and how prefix caching lets requests that "
    "share a system prompt skip recomputing it. Then compare the approach with static "
    "batching, where every request in a batch waits for the slowest one to finish.",
]
GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2, smollm2_oracle_greedy):
    prompt_ids = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    assert max(len(p) for p in prompt_ids) > 64
    ours = smollm2.generate(prompt_ids, GREEDY_32)
    for prompt, ids, output in zip(PROMPTS, prompt_ids, ours):
        expected = smollm2_oracle_greedy(ids, 32)
        assert output.outputs[0].token_ids == expected, prompt


@pytest.mark.slow
def test_smollm2_answers_the_obvious_question(smollm2):
    result = smollm2.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=20),
    )
    assert "Paris" in result.outputs[0].text
    assert result.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_models_match_transformers(name, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dir(name)
    oracle = AutoModelForCausalLM.from_pretrained(directory).eval()
    llm = LLM(**pinned(model=str(directory), max_num_batched_tokens=16, kv_cache_memory_gib=0.01))
    prompts = [
        [(7 * i + 3 * j) % 4000 + 100 for j in range(length)]
        for i, length in enumerate([1, 5, 16, 17, 40, 90])
    ]
    ours = llm.generate(prompts, GREEDY_32)
    for prompt, output in zip(prompts, ours):
        assert output.outputs[0].token_ids == hf_greedy(oracle, prompt, 32), len(prompt)


def test_prompt_logprobs_match_transformers_across_chunks_and_the_prefix_cache(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dir("gqa4-untied")
    oracle = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompt = [(11 * j) % 3000 + 50 for j in range(40)]  # three prefill chunks of 16
    with torch.no_grad():
        expected = torch.log_softmax(oracle(torch.tensor([prompt])).logits[0].float(), dim=-1)
    llm = LLM(**pinned(model=str(directory), max_num_batched_tokens=16, num_kv_blocks=32))
    llm.generate([prompt], SamplingParams(max_tokens=1))  # the prompt is now cached
    params = SamplingParams(max_tokens=1, prompt_logprobs=3)
    out = llm.generate([prompt], params)[0]
    assert out.num_cached_tokens == 0  # cached blocks hold no logits: all recomputed
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        row = expected[position - 1]
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(float(row[prompt[position]]), abs=1e-4)
        top = row.topk(3)
        assert list(entry.top) == top.indices.tolist()
        assert list(entry.top.values()) == pytest.approx(top.values.tolist(), abs=1e-4)

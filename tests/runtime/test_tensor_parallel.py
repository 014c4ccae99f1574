"""Tensor parallelism on CPU: real worker processes in one gloo group.

Only one tensor-parallel engine lives in a process at a time (it owns the default
`torch.distributed` group), so each test shuts its engine down before the next starts.
"""

from __future__ import annotations

import multiprocessing

import pytest

from kubellm.runtime import LLM
from kubellm.runtime.model.source import resolve

from .conftest import TINY_CONFIGS, hf_greedy
from .pins import pinned
from .test_parity import GREEDY_32, PROMPTS


def test_smollm2_splits_over_its_head_divisors_only():
    config = resolve("smollm2-135m-instruct").config
    assert config.tensor_parallel_sizes() == [1, 3]  # 9 heads, but 1536 MLP columns
    with pytest.raises(ValueError, match=r"does not divide this model's 9 attention heads"):
        config.check_tensor_parallel(2)


def test_a_size_that_does_not_divide_the_model_starts_no_worker():
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 .* choose one of 1, 3$"):
        LLM(**pinned(tensor_parallel_size=2))
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_smollm2_over_three_ranks_gives_the_single_rank_and_transformers_tokens(
    smollm2, smollm2_oracle_greedy
):
    prompt_ids = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    single = [o.outputs[0].token_ids for o in smollm2.generate(prompt_ids, GREEDY_32)]
    with LLM(
        **pinned(tensor_parallel_size=3, max_num_batched_tokens=64, kv_cache_memory_gib=0.2)
    ) as llm:
        assert len(llm.engine.workers.pids) == 2
        split = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, GREEDY_32)]
    assert multiprocessing.active_children() == []  # the workers are gone
    assert split == single
    for ids, tokens in zip(prompt_ids, split):
        assert tokens == smollm2_oracle_greedy(ids, 32)


@pytest.mark.parametrize(
    ("name", "size"), [*((name, 2) for name in sorted(TINY_CONFIGS)), ("qwen2-bias", 4)]
)
def test_tiny_models_split_over_ranks_match_transformers(name, size, tiny_model_dir):
    """GQA 4:1 with one KV head (replicated on both ranks), tied and untied heads, Llama-3
    rope, Qwen2's QKV bias; and 2 KV heads over 4 ranks (each KV head on two of them)."""
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dir(name)
    oracle = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompts = [
        [(5 * i + 3 * j) % 4000 + 100 for j in range(length)]
        for i, length in enumerate([1, 17, 40])
    ]
    with LLM(
        **pinned(
            model=str(directory),
            tensor_parallel_size=size,
            max_num_batched_tokens=16,
            kv_cache_memory_gib=0.01,
        ),
    ) as llm:
        ours = llm.generate(prompts, GREEDY_32)
    for prompt, output in zip(prompts, ours):
        assert output.outputs[0].token_ids == hf_greedy(oracle, prompt, 32), len(prompt)


@pytest.mark.cuda
def test_two_gpus_give_the_one_gpu_tokens(tiny_model_dir):
    """NCCL, one rank per GPU, CUDA graphs captured with the all-reduces inside (fp32)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    prompts = [
        [(5 * i + 3 * j) % 4000 + 100 for j in range(length)]
        for i, length in enumerate([1, 17, 40, 3])
    ]
    tokens = {}
    for size in (1, 2):
        with LLM(
            **pinned(
                model=str(tiny_model_dir("gqa3-llama3-rope")),
                tensor_parallel_size=size,
                device="cuda",
                dtype="float32",
                gpu_memory_utilization=0.3,
            ),
        ) as llm:
            assert llm.engine.runner.decode_graphs is not None
            tokens[size] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY_32)]
    assert tokens[2] == tokens[1]

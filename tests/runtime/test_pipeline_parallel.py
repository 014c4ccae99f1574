"""Pipeline parallelism on CPU: the layers split into stages, each stage's ranks real
worker processes in one gloo world, hidden states sent from stage to stage and the
logits to rank 0, which samples. Oracles: transformers, and the same engine on one rank.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.executor.distributed import stage_layers

from .conftest import hf_greedy
from .pins import pinned
from .test_parity import GREEDY_32, PROMPTS


@pytest.mark.parametrize(
    ("layers", "stages", "split"),
    [
        (30, 2, [15, 15]),
        (30, 3, [10, 10, 10]),
        (30, 4, [7, 8, 8, 7]),  # vLLM's: the extra layers to the stages before the last
        (5, 3, [2, 2, 1]),
        (2, 2, [1, 1]),
    ],
)
def test_layers_split_into_contiguous_stages_as_vllm_splits_them(layers, stages, split):
    ranges = [stage_layers(layers, stages, i) for i in range(stages)]
    assert [len(r) for r in ranges] == split
    assert [i for r in ranges for i in r] == list(range(layers))


def test_more_stages_than_layers_is_refused_before_any_worker_starts(tiny_model_dir):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size 3 is more than this model's 2"):
        LLM(**pinned(model=str(tiny_model_dir("mha-tied")), pipeline_parallel_size=3))
    assert multiprocessing.active_children() == []


TINY_PROMPTS = [[(5 * i + 3 * j) % 4000 + 100 for j in range(n)] for i, n in enumerate([1, 17, 40])]


@pytest.mark.parametrize(
    ("name", "tp", "pp"),
    [("gqa4-untied", 2, 2), ("gqa3-llama3-rope", 2, 2), ("qwen2-bias", 1, 2)],
)
def test_tiny_models_over_stages_match_transformers(name, tp, pp, tiny_model_dir):
    """Two stages of two ranks: GQA with one KV head (replicated) and an untied head; GQA
    3:1 with Llama-3 rope and a tied head (the last stage then holds the embedding too);
    and two stages of one rank with Qwen2's QKV bias. Prompts longer than a prefill chunk."""
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dir(name)
    oracle = AutoModelForCausalLM.from_pretrained(directory).eval()
    settings = dict(max_num_batched_tokens=16, kv_cache_memory_gib=0.01)
    with LLM(
        **pinned(
            model=str(directory), tensor_parallel_size=tp, pipeline_parallel_size=pp, **settings
        )
    ) as llm:
        assert len(llm.engine.workers.pids) == tp * pp - 1
        ours = llm.generate(TINY_PROMPTS, GREEDY_32)
    assert multiprocessing.active_children() == []
    for prompt, output in zip(TINY_PROMPTS, ours):
        assert output.outputs[0].token_ids == hf_greedy(oracle, prompt, 32), len(prompt)


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 3])
def test_smollm2_over_stages_gives_the_single_rank_and_transformers_tokens(
    stages, smollm2, smollm2_oracle_greedy
):
    prompt_ids = [smollm2.tokenizer.encode(p) for p in PROMPTS]
    single = [o.outputs[0].token_ids for o in smollm2.generate(prompt_ids, GREEDY_32)]
    with LLM(
        **pinned(pipeline_parallel_size=stages, max_num_batched_tokens=64, kv_cache_memory_gib=0.2)
    ) as llm:
        split = [o.outputs[0].token_ids for o in llm.generate(prompt_ids, GREEDY_32)]
    assert multiprocessing.active_children() == []
    assert split == single
    for ids, tokens in zip(prompt_ids, split):
        assert tokens == smollm2_oracle_greedy(ids, 32)


def test_batches_in_flight_of_aborted_sequences_are_still_collected(tiny_model_dir):
    """Abort everything while a batch is in flight: the engine still has work until that
    batch is back (the last stage waits to hand its logits over), then nothing is held."""
    from kubellm.runtime import EngineConfig, LLMEngine, SamplingParams

    from .invariants import check_all_free

    config = pinned(model=str(tiny_model_dir("mha-tied")), pipeline_parallel_size=2)
    engine = LLMEngine(EngineConfig(**config, max_num_batched_tokens=8, num_kv_blocks=32))
    try:
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        for name in ("a", "b"):  # 8 tokens each: one batch each
            engine.add_request(name, *engine.admission.admit([[7] * 8], params))
        engine.step()  # launches a's batch and b's, collects a's
        assert len(engine._in_flight) == 1
        engine.abort_request("a")
        engine.abort_request("b")
        assert not engine.scheduler.has_unfinished()
        assert engine.has_unfinished_requests()  # b's batch is still out
        while engine.has_unfinished_requests():
            engine.step()
        assert not engine._in_flight
        check_all_free(engine.kv)
        assert engine.take_output("b").outputs[0].finish_reason == "abort"
    finally:
        engine.shutdown()


def test_bf16_logits_cross_the_stage_boundary_in_bf16_and_sample_as_on_one_rank(tiny_model_dir):
    """The last stage sends its logits in the activations' dtype (half the bytes in bf16)
    and rank 0 upcasts them, exactly (bf16 to fp32 is exact). The logprobs are close, not
    equal, to one rank's: two stages batch differently (a batch per stage in flight),
    and torch's bf16 products on CPU round a row differently at different batch sizes
    (issue 28)."""
    settings = pinned(
        model=str(tiny_model_dir("gqa4-untied")),
        dtype="bfloat16",
        max_num_batched_tokens=16,
        kv_cache_memory_gib=0.01,
    )
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True)
    outputs = {}
    for stages in (1, 2):
        with LLM(**settings, pipeline_parallel_size=stages) as llm:
            assert llm.engine.runner.dtype == torch.bfloat16
            outputs[stages] = [o.outputs[0] for o in llm.generate(TINY_PROMPTS, params)]
    for one, two in zip(outputs[1], outputs[2]):
        assert one.token_ids == two.token_ids
        for a, b in zip(one.logprobs, two.logprobs):
            assert a.top.keys() == b.top.keys()
            assert a.top == pytest.approx(b.top, abs=0.05)

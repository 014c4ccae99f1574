"""Decode steps through the CUDA-graph static buffers.

On CPU no graph is captured: `DecodeGraphs.run` executes the same padded step eagerly
(Triton under the interpreter), which is where padding bugs live: a padding row that
kept a stale slot would overwrite another request's K/V. On a GPU the real capture and
replay are compared with eager execution.
"""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.core.scheduler import ScheduledSequence, SchedulerOutput
from kubellm.runtime.core.sequence import Sequence
from kubellm.runtime.executor.cuda_graphs import DecodeGraphs, graph_batch_sizes
from kubellm.runtime.executor.step_plan import StepPlan
from tests.helpers import TRITON_DEVICE

from .pins import pinned


def test_graph_batch_sizes_hold_max_num_seqs_with_little_padding():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 8]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, *range(16, 113, 16)]
    assert graph_batch_sizes(256)[-1] == 256
    assert graph_batch_sizes(10_000)[-1] == 512


def _decode_step(requests: list[tuple[int, list[int]]]) -> StepPlan:
    """One new token for each (context length, block ids) pair."""
    scheduled = []
    for i, (seq_len, blocks) in enumerate(requests):
        tokens = [(31 * i + 7 * j) % 200 + 1 for j in range(seq_len)]
        request = Sequence(f"r{i}", tokens, SamplingParams(max_tokens=1), frozenset(), 512)
        request.num_computed_tokens, request.block_ids = seq_len - 1, blocks
        scheduled.append(ScheduledSequence(request, 1))
    return SchedulerOutput(scheduled).plan(16)


@pytest.mark.parametrize("num_sms", [1, 16], ids=["one-launch", "split-kv"])
def test_a_padded_decode_writes_only_its_own_slots_and_matches_eager(tiny_model_dir, num_sms):
    llm = LLM(
        **pinned(
            model=str(tiny_model_dir("gqa4-untied")),
            attention_backend="triton",
            block_size=16,
            num_kv_blocks=40,
            device=TRITON_DEVICE,
            dtype="float32",
            enforce_eager=True,
        ),
    )
    runner = llm.engine.runner
    runner.model.attention_backend.num_sms = num_sms  # 16: the graphs' decode splits the KV
    # Four requests fill a batch of 4; then one is gone and its block belongs to another
    # request, so a padding row that replayed its stale slot would overwrite live K/V.
    first = _decode_step([(20, [0, 1]), (5, [2]), (33, [3, 4, 5]), (17, [6, 7])])
    second = _decode_step([(21, [0, 1]), (6, [2]), (40, [8, 9, 7])])
    generator = torch.Generator().manual_seed(0)
    history = [torch.randn(c.shape, generator=generator).to(c.device) for c in runner.kv_caches]
    reused = [torch.randn(c.shape, generator=generator).to(c.device) for c in runner.kv_caches]

    def run(graphs: DecodeGraphs | None):
        runner.decode_graphs = graphs
        for cache, values in zip(runner.kv_caches, history):
            cache.copy_(values)
        logits = [runner.execute(first)[0]]
        for cache, values in zip(runner.kv_caches, reused):
            cache.copy_(values)
        logits.append(runner.execute(second)[0])
        return logits, [cache.clone() for cache in runner.kv_caches]

    eager_logits, eager_caches = run(None)
    graphs = DecodeGraphs(runner.model, runner.kv_caches, [1, 2, 4, 8], 512, 16)
    padded_logits, padded_caches = run(graphs)
    assert graphs.steps_run == 2
    for got, want in zip(padded_logits + padded_caches, eager_logits + eager_caches):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_engine_through_decode_buffers_gives_eager_tokens(tiny_model_dir):
    llm = LLM(
        **pinned(
            model=str(tiny_model_dir("gqa3-llama3-rope")),
            attention_backend="triton",
            block_size=16,
            max_num_batched_tokens=32,
            num_kv_blocks=40,
            device=TRITON_DEVICE,
            dtype="float32",
            enforce_eager=True,
        ),
    )
    runner = llm.engine.runner
    prompts = [list(range(3, 3 + n)) for n in (5, 19, 2, 40, 11)]
    # Staggered lengths: the decode batch shrinks 5 -> 1 through padded sizes, and the
    # second wave reuses the first wave's freed blocks.
    waves = [(prompts, (3, 9, 6, 3, 9)), (prompts[::-1], (6, 3, 9, 6, 3))]

    def generate() -> list[list[int]]:
        tokens = []
        for wave_prompts, lengths in waves:
            params = [
                SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in lengths
            ]
            tokens += [o.outputs[0].token_ids for o in llm.generate(wave_prompts, params)]
        return tokens

    eager = generate()
    runner.decode_graphs = DecodeGraphs(
        runner.model, runner.kv_caches, graph_batch_sizes(8), llm.engine.max_model_len, 16
    )
    assert generate() == eager
    assert runner.decode_graphs.steps_run > 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_pipeline_stages_through_decode_buffers_give_eager_tokens(tiny_model_dir):
    """Each stage through its own buffers: the first hands on its hidden states and
    residual, the last continues from what it received."""
    llm = LLM(
        **pinned(
            model=str(tiny_model_dir("gqa3-llama3-rope")),
            attention_backend="triton",
            pipeline_parallel_size=2,
            block_size=16,
            num_kv_blocks=40,
            device=TRITON_DEVICE,
            dtype="float32",
            enforce_eager=True,
        ),
    )
    prompts = [list(range(3, 3 + n)) for n in (5, 19, 2, 11)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 6, 9, 4)]
    try:
        eager = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        llm.engine.workers.send("use_decode_graphs", False)
        llm.engine.runner.use_decode_graphs(capture=False)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == eager
        assert llm.engine.runner.decode_graphs.steps_run > 0
        assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    finally:
        llm.shutdown()


@pytest.mark.cuda
@pytest.mark.parametrize("stages", [1, 2])
def test_captured_graphs_replay_the_eager_tokens(stages):
    """One GPU, and two pipeline stages on two GPUs, each capturing its own graphs."""
    import torch

    if torch.cuda.device_count() < stages:
        pytest.skip(f"needs {stages} GPUs")
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,"]
    outputs = {}
    for eager in (True, False):
        llm = LLM(
            **pinned(
                device="cuda",
                dtype="float32",
                enforce_eager=eager,
                pipeline_parallel_size=stages,
                max_num_seqs=8,
                gpu_memory_utilization=0.4,
            ),
        )  # the previous engine may still be alive
        try:
            outputs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            graphs = llm.engine.runner.decode_graphs
            if eager:
                assert graphs is None
            else:
                assert sorted(graphs.graphs) == [1, 2, 4, 8] and graphs.steps_run > 0
        finally:
            llm.shutdown()
    assert outputs[False] == outputs[True]

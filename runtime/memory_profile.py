"""How much memory one step at the largest batch needs beyond the weights, so the KV pool
can take the rest of `gpu_memory_utilization` without the first big prefill running out.

The largest step the scheduler can produce: `max_num_batched_tokens` prompt tokens,
split over `max_num_seqs` dummy requests that each end their prompt and so sample (the
logits and the sampler's sorting are [requests, vocab] tensors: with a 128k vocabulary
they, not the layers, can set the peak). It goes through the real model on a throwaway
KV cache just big enough for it, then (on rank 0, which samples) the sampler with top-k
and top-p; the peak allocation above what was there before is the activations'. Every
tensor-parallel rank runs the same pass (its collectives included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kubellm.runtime.request import Request
from kubellm.runtime.sampler import Sampler
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.scheduler import ScheduledRequest, SchedulerOutput
from kubellm.runtime.step_plan import StepPlan

if TYPE_CHECKING:
    from kubellm.runtime.model_runner import ModelRunner


def profile_batch(
    num_tokens: int, num_seqs: int, block_size: int
) -> tuple[StepPlan, list[Request], int]:
    """The largest step: `num_tokens` prompt tokens over min(num_seqs, num_tokens) requests
    that each sample; its plan, its requests and the blocks a throwaway cache needs."""
    count = min(num_seqs, num_tokens)
    lengths = [num_tokens // count + (i < num_tokens % count) for i in range(count)]
    params = SamplingParams(max_tokens=1, temperature=0.7, top_k=50, top_p=0.9)
    requests, next_block = [], 0
    for i, length in enumerate(lengths):
        request = Request(f"profile-{i}", [0] * length, params, frozenset(), length + 1)
        blocks = -(-length // block_size)
        request.block_ids = list(range(next_block, next_block + blocks))
        next_block += blocks
        requests.append(request)
    out = SchedulerOutput([ScheduledRequest(r, r.num_tokens) for r in requests])
    return StepPlan.from_schedule(out, block_size), requests, next_block


def run_profile_step(runner: ModelRunner, num_tokens: int, num_seqs: int) -> list[int] | None:
    """The forward pass (and on rank 0 the sampler) over the profile batch, on a throwaway
    cache; the tokens drawn on rank 0, None on the other ranks."""
    plan, requests, num_blocks = profile_batch(num_tokens, num_seqs, runner.block_size)
    kept, runner.kv_caches = runner.kv_caches, runner.allocate_kv(num_blocks)
    try:
        logits, _ = runner.execute(plan)
        return None if logits is None else Sampler(seed=0)(logits, requests).token_ids
    finally:
        runner.kv_caches = kept


def activation_peak_bytes(runner: ModelRunner, num_tokens: int, num_seqs: int) -> int:
    """CUDA only: bytes the largest step allocates beyond what is already allocated
    (the throwaway cache not counted: the real pool is sized separately)."""
    device = runner.device
    _, _, num_blocks = profile_batch(num_tokens, num_seqs, runner.block_size)
    throwaway_cache = num_blocks * runner.kv_block_bytes()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_profile_step(runner, num_tokens, num_seqs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - throwaway_cache
    torch.cuda.empty_cache()
    return max(0, peak)

"""How much memory one step at the largest batch needs beyond the weights, so the KV pool
can take the rest of `gpu_memory_utilization` without the first big prefill running out.

The largest step the scheduler can produce: `max_num_batched_tokens` prompt tokens,
split over `max_num_seqs` dummy requests that each end their prompt and so sample (the
logits and the sampler's sorting are [requests, vocab] tensors: with a 128k vocabulary
they, not the layers, can set the peak). It goes through the real model on a throwaway
KV cache just big enough for it, then the sampler with top-k and top-p; the peak
allocation above what was there before is the activations'.
"""

from __future__ import annotations

import torch

from kubellm.runtime.model_runner import ModelRunner
from kubellm.runtime.request import Request
from kubellm.runtime.sampler import Sampler
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.scheduler import ScheduledRequest, SchedulerOutput


def profile_batch(
    model, num_tokens: int, num_seqs: int, block_size: int, device: torch.device,
    dtype: torch.dtype,
) -> tuple[ModelRunner, list[Request]]:  # fmt: skip
    """The largest step: `num_tokens` prompt tokens over min(num_seqs, num_tokens) requests
    that each sample, and a throwaway runner whose cache just holds them."""
    count = min(num_seqs, num_tokens)
    lengths = [num_tokens // count + (i < num_tokens % count) for i in range(count)]
    tables = _block_tables(lengths, block_size)
    runner = ModelRunner(model, sum(len(t) for t in tables), block_size, device, dtype)
    params = SamplingParams(max_tokens=1, temperature=0.7, top_k=50, top_p=0.9)
    requests = []
    for i, (length, table) in enumerate(zip(lengths, tables)):
        request = Request(f"profile-{i}", [0] * length, params, frozenset(), length + 1)
        request.block_ids = table
        requests.append(request)
    return runner, requests


def run_profile_step(runner: ModelRunner, requests: list[Request]) -> list[int]:
    """The forward pass and the sampler over the profile batch; the tokens drawn."""
    logits, _ = runner.execute(
        SchedulerOutput([ScheduledRequest(r, r.num_tokens) for r in requests])
    )
    return Sampler(seed=0)(logits, requests).token_ids


def _block_tables(lengths: list[int], block_size: int) -> list[list[int]]:
    """Consecutive block ids for requests of these lengths."""
    tables, next_id = [], 0
    for length in lengths:
        blocks = -(-length // block_size)
        tables.append(list(range(next_id, next_id + blocks)))
        next_id += blocks
    return tables


def activation_peak_bytes(model, num_tokens: int, num_seqs: int, block_size: int,
                          device: torch.device, dtype: torch.dtype) -> int:  # fmt: skip
    """CUDA only: bytes the largest step allocates beyond what is already allocated
    (the throwaway cache not counted: the real pool is sized separately)."""
    runner, requests = profile_batch(model, num_tokens, num_seqs, block_size, device, dtype)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_profile_step(runner, requests)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del runner
    torch.cuda.empty_cache()
    return peak

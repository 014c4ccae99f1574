"""How much memory one step at the largest batch needs beyond the weights, so the KV pool
can take the rest of `gpu_memory_utilization` without the first big prefill running out.

One dummy request of `max_num_batched_tokens` prompt tokens (the largest step the
scheduler can produce) goes through the real model on a throwaway KV cache just big
enough for it; the peak allocation above what was there before is the activations'.
"""

from __future__ import annotations

import torch

from kubellm.runtime.model_runner import ModelRunner
from kubellm.runtime.request import Request
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.scheduler import ScheduledRequest, SchedulerOutput


def dummy_step(model, num_tokens: int, block_size: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Run one prefill of `num_tokens` tokens on a throwaway cache; the logits it samples."""
    num_blocks = -(-num_tokens // block_size)
    runner = ModelRunner(model, num_blocks, block_size, device, dtype)
    request = Request("profile", [0] * num_tokens, SamplingParams(max_tokens=1), frozenset(),
                      num_tokens + 1)  # fmt: skip
    request.block_ids = list(range(num_blocks))
    logits = runner.execute(SchedulerOutput([ScheduledRequest(request, num_tokens)]))
    del runner
    return logits


def activation_peak_bytes(model, num_tokens: int, block_size: int, device: torch.device,
                          dtype: torch.dtype) -> int:  # fmt: skip
    """CUDA only: bytes the largest step allocates beyond what is already allocated."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    dummy_step(model, num_tokens, block_size, device, dtype)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak

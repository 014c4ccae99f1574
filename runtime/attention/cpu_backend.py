"""The CPU attention backend: fp32 on CPUs with AVX2, by kubellm's C kernels
(kernels/cpu_ops.py), over an fp32 or fp16 KV cache (`Placement.kv_dtype`; fp32
arithmetic either way). The new K/V go to their slots in one call, and every decoding
request of the step (one new token) attends in one call that reads its blocks in place:
no gather of the contexts, no padding to the longest, no mask. Prefills and prefill
chunks attend as the torch backend's do (one SDPA call per request, where the per-call
overhead is small beside the work).
"""

from __future__ import annotations

import torch

from kubellm.kernels import cpu_ops
from kubellm.runtime.attention.backend import AttentionMetadata
from kubellm.runtime.attention.torch_backend import attend_each


class CpuAttentionBackend:
    supports_cuda_graphs = False

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        cpu_ops.write_kv(key, value, kv_cache, meta.slot_mapping)
        out = torch.empty(query.shape)
        decodes = meta.one_token_requests if cpu_ops.attends(query.shape[-1]) else None
        if decodes is not None:
            cpu_ops.decode_attention(query, kv_cache, decodes.rows, decodes.seq_lens,
                                     decodes.block_tables, scale, out)  # fmt: skip
        done = [] if decodes is None else decodes.requests
        if len(done) < len(meta.seq_lens_cpu):
            attend_each(query, out, kv_cache, meta, scale, done)
        return out

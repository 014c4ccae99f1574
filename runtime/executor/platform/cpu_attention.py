"""The CPU attention backend: fp32 on CPUs with AVX2, by kubellm's C kernels
(kernels/cpu_ops.py), over an fp32 or fp16 KV cache (the platform's `kv_dtype`; fp32
arithmetic either way). The new K/V go to their slots in one call, then every new token
of the step attends in one call as a one-token query over its own causal context, read
in place from the cache: no gather, no padding, no mask. A token is so computed the same
way, from the K/V as the cache stores them, whether it came in a whole prompt, a prefill
chunk after a prefix-cache hit, a recomputation after preemption or a decode step (the
decode steps' fused layers run the same kernel), which keeps a greedy request's tokens
independent of what the prefix cache held. Head sizes the kernel does not take attend
as the torch backend's do.
"""

from __future__ import annotations

import torch

from kubellm.kernels import cpu_ops
from kubellm.runtime.executor.platform.torch_attention import attend_each
from kubellm.runtime.model.attention import AttentionMetadata


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
        if cpu_ops.attends(query.shape[-1]):
            tokens = meta.token_contexts
            cpu_ops.decode_attention(
                query, kv_cache, tokens.rows, tokens.seq_lens, tokens.block_tables, scale, out
            )
        else:
            attend_each(query, out, kv_cache, meta, scale)
        return out

"""The Triton backend: the paged-attention kernels of `kubellm.kernels`, one launch per
layer for a whole mixed batch. Decode-only steps with few requests and long contexts
switch to split-KV (flash-decoding) so the GPU is not left mostly idle; both kernels
give a token the same bits, so the switch depends on the batch and a token's result
does not.

Selected automatically on CUDA; on CPU it runs under TRITON_INTERPRET=1 (slowly: that
is how its correctness is tested without a GPU).
"""

from __future__ import annotations

import torch

from kubellm.kernels.paged_attention import (
    SEGMENT_BLOCKS,
    paged_attention,
    paged_decode,
    write_kv,
)
from kubellm.runtime.executor.step_plan import cdiv
from kubellm.runtime.model.attention import AttentionMetadata


def splits_decode(num_requests: int, num_kv_heads: int, max_blocks: int, num_sms: int) -> bool:
    """Whether a decode-only step runs split-KV: when a program per request and KV head
    would leave the GPU under two per SM, and some context spans several segments."""
    return num_requests * num_kv_heads < 2 * num_sms and max_blocks > SEGMENT_BLOCKS


class TritonAttentionBackend:
    supports_cuda_graphs = True

    def __init__(self) -> None:
        # The current device: a tensor-parallel rank r has made GPU r current.
        self.num_sms = (
            torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            if torch.cuda.is_available()
            else 1
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        if meta.max_query_len == 1 and splits_decode(
            meta.seq_lens.shape[0],
            k_cache.shape[2],
            cdiv(meta.max_seq_len, meta.block_size),
            self.num_sms,
        ):
            return paged_decode(query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
        return paged_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            meta.max_query_len,
        )

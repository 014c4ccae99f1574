"""The reference attention backend: plain torch over the paged cache.

Every new token of a step attends in a call of its own, as a one-token query over its
own causal context (its position + 1 tokens of its request's cache, read in place when
the request's blocks are consecutive, else gathered once per request), with no mask and
no padding: the same call, on the same K/V as the cache stores them, whether the token
came in a whole prompt, a prefill chunk after a prefix-cache hit, a recomputation after
preemption or a decode step beside any other requests. SDPA's result for a row depends
on the shape of the call it is in (its blocking and the BLAS's choices follow it), so a
padded batch of decodes or a causal prefill in one call would give a token other bits
than it gets alone, and a greedy request other tokens. Against those calls it costs
~6x the attention time of a 512-token prefill (~50 us per call, whatever its size) and
1.8x at 4 decodes, while at 16 and 64 decodes it is faster (no padding)
(`python benchmarks/cpu_attention.py`, BENCHMARKS.md): this backend serves where
kubellm's C kernels cannot, and in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kubellm.runtime.model.attention import AttentionMetadata


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slots: torch.Tensor,
    skips_slots: bool,
) -> None:
    """Scatter new K/V rows into the cache; with `skips_slots`, slot -1 (padding) is skipped."""
    if skips_slots:
        keep = slots >= 0
        key, value, slots = key[keep], value[keep], slots[keep]
    num_kv_heads, head_dim = key.shape[1:]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value


def attend_token(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
    """One token's attention over its whole context.

    query [heads, dim]; key/value [kv_heads, context, dim] -> [heads, dim]. The query
    heads that share a KV head are the rows of one SDPA query (they all see every key),
    so no K/V is repeated; the leading batch dim of 1 lets SDPA pick its fused CPU kernel.
    """
    num_kv_heads, head_dim = key.shape[0], key.shape[2]
    grouped = query.reshape(num_kv_heads, -1, head_dim)
    out = F.scaled_dot_product_attention(grouped[None], key[None], value[None], scale=scale)
    return out.view(query.shape)


class TorchAttentionBackend:
    supports_cuda_graphs = False  # it reads host copies of the metadata

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping, meta.skips_slots)
        out = torch.empty_like(query)
        attend_each(query, out, kv_cache, meta, scale)
        return out


def kv_rows(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as [blocks, whole block] views: index_select on their rows copies ~1.6x
    faster than advanced indexing on the 5-D cache."""
    num_blocks = kv_cache.shape[1]
    return kv_cache[0].view(num_blocks, -1), kv_cache[1].view(num_blocks, -1)


def attend_each(
    query: torch.Tensor,
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> None:
    """Every new token of the step attended by `attend_token` into its row of out."""
    num_kv_heads, head_dim = kv_cache.shape[3:]
    k_rows, v_rows = kv_rows(kv_cache)
    start = 0
    for i, (q_len, seq_len, first) in enumerate(
        zip(meta.query_lens_cpu, meta.seq_lens_cpu, meta.contiguous_starts)
    ):
        blocks = meta.request_blocks[i]
        if first >= 0:  # consecutive blocks: read the pool in place
            k, v = k_rows[first : first + len(blocks)], v_rows[first : first + len(blocks)]
        else:
            k, v = k_rows.index_select(0, blocks), v_rows.index_select(0, blocks)
        k = k.view(-1, num_kv_heads, head_dim)[:seq_len].to(query.dtype).transpose(0, 1)
        v = v.view(-1, num_kv_heads, head_dim)[:seq_len].to(query.dtype).transpose(0, 1)
        first_context = seq_len - q_len + 1  # the context of the request's first new token
        for row in range(q_len):
            context = first_context + row
            out[start + row] = attend_token(
                query[start + row], k[:, :context], v[:, :context], scale
            )
        start += q_len

"""The reference attention backend: plain torch over the paged cache.

Each request's context is gathered through its block table and attended with
SDPA, one request at a time. On a CPU this beats one padded batched call: it
copies and reads only real tokens, and the copy is what costs (memory bandwidth).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kubellm.runtime.attention.backend import AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor):
    """Scatter new K/V rows into the cache; slot -1 (padding) is skipped."""
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots = key[keep], value[keep], slots[keep]
    num_kv_heads, head_dim = key.shape[1:]
    kv_cache[0].view(-1, num_kv_heads, head_dim)[slots] = key
    kv_cache[1].view(-1, num_kv_heads, head_dim)[slots] = value


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[2, length, kv_heads, head_dim]: the first `length` cached tokens of one request."""
    block_size = kv_cache.shape[2]
    blocks = kv_cache[:, block_table[: -(-length // block_size)]]
    return blocks.flatten(1, 2)[:, :length]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
    """Causal attention of the last `q_len` positions of a `kv_len`-token context.

    query [q_len, heads, dim]; key/value [kv_len, kv_heads, dim] -> [q_len, heads, dim].
    """
    q_len, kv_len = query.shape[0], key.shape[0]
    # A leading batch dim of 1 lets SDPA pick its fused CPU kernel (3-D inputs fall back to math).
    q, k, v = (t.transpose(0, 1)[None] for t in (query, key, value))
    mask = None  # a single new token sees the whole context
    if 1 < q_len < kv_len:  # a prefill chunk after cached context: causal, offset
        positions = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        mask = torch.arange(kv_len, device=q.device)[None, :] <= positions
    causal = q_len == kv_len and q_len > 1
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


class TorchAttentionBackend:
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(key, value, kv_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            k, v = gather_kv(kv_cache, meta.block_tables[i], seq_len)
            rows = slice(start, start + q_len)
            out[rows] = attend(query[rows], k, v, scale)
            start += q_len
        return out

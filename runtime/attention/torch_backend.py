"""The reference attention backend: plain torch over the paged cache.

Decodes (one new token per request) are batched: their context is gathered
through the block tables into one padded tensor and attended in one call.
Prefill chunks are attended one request at a time with an offset causal mask.
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


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """[2, num_reqs, length, kv_heads, head_dim]: each request's first `length` cached tokens."""
    num_blocks_needed = -(-length // kv_cache.shape[2])
    blocks = kv_cache[:, block_tables[:, :num_blocks_needed]]
    two, reqs, nb, bs, heads, dim = blocks.shape
    return blocks.reshape(two, reqs, nb * bs, heads, dim)[:, :, :length]


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
        if meta.decode_indices.numel():
            self._decode(query, kv_cache, meta, scale, out)
        starts = meta.query_start_loc.tolist() if meta.num_reqs else []
        for i, (q_len, s_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if q_len != 1:
                rows = slice(starts[i], starts[i] + q_len)
                out[rows] = self._prefill(query[rows], kv_cache, meta.block_tables[i], s_len, scale)
        return out

    def _decode(self, query, kv_cache, meta: AttentionMetadata, scale, out) -> None:
        idx = meta.decode_indices
        rows = meta.query_start_loc[idx].long()
        seq_lens = meta.seq_lens[idx]
        length = int(seq_lens.max())
        k, v = gather_kv(kv_cache, meta.block_tables[idx], length)
        q = query[rows].unsqueeze(2)  # [reqs, heads, 1, dim]
        mask = (torch.arange(length, device=q.device) < seq_lens[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[rows] = o.squeeze(2)

    def _prefill(self, query, kv_cache, block_table, seq_len: int, scale) -> torch.Tensor:
        k, v = gather_kv(kv_cache, block_table[None], seq_len)
        q_len = query.shape[0]
        q = query.transpose(0, 1)[None]  # [1, heads, q_len, dim]
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if q_len == seq_len:
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            positions = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= positions
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        return o[0].transpose(0, 1)

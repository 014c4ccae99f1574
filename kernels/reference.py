"""Pure-torch references for the Triton kernels: slow, obvious, and the tests' oracle.

Layouts (the runtime's paged KV cache):
  k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]
  slot = block_id * block_size + offset; slot -1 means "no slot" (padding)
A flat batch: request i owns query rows query_start_loc[i]:query_start_loc[i+1]; after
this step it has seq_lens[i] tokens of context, the new ones last, its K/V in the blocks
block_tables[i, :]. Attention is causal: the query at context position p sees keys
0..p.
"""

from __future__ import annotations

import math

import torch


def write_kv_reference(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key/value [tokens, kv_heads, dim] into the cache at their slots (-1: skipped)."""
    num_kv_heads, head_dim = key.shape[1:]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[keep].to(v_cache.dtype)


def paged_attention_reference(
    query: torch.Tensor,  # [tokens, heads, dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [requests, max_blocks]
    query_start_loc: torch.Tensor,  # [requests + 1]
    seq_lens: torch.Tensor,  # [requests]
    scale: float,
) -> torch.Tensor:
    """Per request: gather its context, causal attention in fp32 -> [tokens, heads, dim]."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = query.shape[1] // num_kv_heads
    out = torch.zeros_like(query)
    for i in range(len(seq_lens)):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        seq_len, q_len = int(seq_lens[i]), end - start
        if q_len == 0:
            continue
        blocks = block_tables[i, : math.ceil(seq_len / block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)  # [seq, heads, dim]
        v = v.repeat_interleave(group, dim=1)
        q = query[start:end].float()  # [q_len, heads, dim]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        positions = torch.arange(seq_len - q_len, seq_len)[:, None]
        visible = torch.arange(seq_len)[None, :] <= positions  # [q_len, seq]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
    return out


def quantized_gemm_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """x [M, K] @ W.T, W [N, K] = q * s + o per group of `group_size` inputs; q: codes
    uint8 [N, K/2], the even k in the low nibble (4-bit), or int8 [N, K] (8-bit)."""
    q = codes.float()
    if bits == 4:
        q = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(codes.shape[0], -1).float()
    groups = q.view(q.shape[0], -1, group_size)
    weight = (groups * scales[..., None] + offsets[..., None]).view(q.shape)
    return (x.float() @ weight.T).to(x.dtype)


def cpu_qgemm_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group: int,
) -> torch.Tensor:
    """What cpu_qgemm computes: each row of x rounded to int8 per block of 32 inputs
    (scale max|x| / 127, ties to even) times q * s, plus o times x's exact group sums;
    in fp32. codes as for quantized_gemm_reference (4-bit) or int8 [N, K]; fp16 scales, offsets."""
    x = x.float()
    if bits == 4:
        q = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(codes.shape[0], -1)
    else:
        q = codes
    blocks = x.view(x.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(step > 0, 1 / step, 0)  # as the kernel: times the reciprocal
    rounded = (blocks * inverse).round() * step  # round: ties to even, as cvtps_epi32
    groups = q.float().view(q.shape[0], -1, group) * scales.float()[..., None]
    sums = x.view(x.shape[0], -1, group).sum(-1)
    return rounded.view(x.shape) @ groups.view(q.shape).T + sums @ offsets.float().T

"""Triton kernels for attention over the paged KV cache (references: `reference.py`).

- `write_kv`: new K/V rows into their cache slots (slot -1: skipped, as CUDA-graph
  padding needs).
- `paged_attention`: one launch for a whole mixed batch - prefill chunks, chunks after a
  prefix-cache hit, single-token decodes. A program takes one request, one KV head and a
  tile of that request's query tokens; the query heads that share the KV head are rows of
  the same tile, so each K/V block is loaded once for all of them (GQA). Online softmax,
  fp32 accumulation, any of fp32/fp16/bf16 in and out.
- `paged_decode`: flash-decoding for decode-only batches that would under-fill the GPU:
  each program attends one KV segment; a second kernel merges the segments' partial
  results.

The caches are [num_blocks, block_size, num_kv_heads, head_dim]; the interpreter
(TRITON_INTERPRET=1) runs all three on CPU, where bf16 inputs are upcast on load.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Fused multiply-add in the compiled kernels: Triton 3.9's default, which 3.10 changes
# (chosen here, which also quiets the warning it prints at the first compile).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@triton.jit
def _write_kv_kernel(
    key,
    value,
    k_cache,
    v_cache,
    slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots + token).to(tl.int64)
    if slot < 0:
        return
    d = tl.arange(0, BLOCK_D)
    in_dim = d < HEAD_DIM
    k = tl.load(key + token * stride_kt + head * stride_kh + d, mask=in_dim)
    v = tl.load(value + token * stride_vt + head * stride_vh + d, mask=in_dim)
    where = (slot * NUM_KV_HEADS + head) * HEAD_DIM + d
    tl.store(k_cache + where, k.to(k_cache.dtype.element_ty), mask=in_dim)
    tl.store(v_cache + where, v.to(v_cache.dtype.element_ty), mask=in_dim)


def write_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """key/value [tokens, kv_heads, dim] -> caches [blocks, block_size, kv_heads, dim]."""
    tokens, num_kv_heads, head_dim = key.shape
    if tokens == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert key.stride(2) == 1 and value.stride(2) == 1
    _write_kv_kernel[(tokens, num_kv_heads)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _attend_blocks(
    q_ptr,
    row_pos,
    row_ok,
    k_cache,
    v_cache,
    table_row,
    first_block,
    last_block,
    seq_len,
    scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    kv_head,
    NATIVE_DOT: tl.constexpr,
):
    """Load the query rows at `q_ptr` [M, D] and run their online softmax over the KV
    blocks [first_block, last_block); returns the unnormalized (acc, max, sum).

    NATIVE_DOT (fp16/bf16 on a GPU): the dots take the cache's dtype, accumulating in
    fp32, as flash attention does. Otherwise everything is fp32 and the dots exact
    ("ieee", not TF32): fp32 caches, and the interpreter, which mishandles bf16."""
    d = tl.arange(0, BLOCK_D)
    offsets = tl.arange(0, BLOCK_SIZE)
    in_dim = d < HEAD_DIM
    q = tl.load(q_ptr, mask=row_ok[:, None] & in_dim[None, :], other=0.0)
    q = q.to(k_cache.dtype.element_ty) if NATIVE_DOT else q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for b in range(first_block, last_block):
        block = tl.load(table_row + b).to(tl.int64)
        key_pos = b * BLOCK_SIZE + offsets  # [N] positions in the context
        rows = (block * BLOCK_SIZE + offsets) * NUM_KV_HEADS + kv_head
        kv_ptr = rows[:, None] * HEAD_DIM + d[None, :]
        kv_ok = (key_pos < seq_len)[:, None] & in_dim[None, :]
        k = tl.load(k_cache + kv_ptr, mask=kv_ok, other=0.0)
        v = tl.load(v_cache + kv_ptr, mask=kv_ok, other=0.0)
        if NATIVE_DOT:
            scores = tl.dot(q, tl.trans(k))
        else:
            k, v = k.to(tl.float32), v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        scores = scores * scale  # [M, N]
        visible = (key_pos[None, :] <= row_pos[:, None]) & row_ok[:, None]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if NATIVE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attention_kernel(
    query,
    out,
    k_cache,
    v_cache,
    block_tables,
    query_start_loc,
    seq_lens,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc + request)
    q_len = tl.load(query_start_loc + request + 1) - q_start
    if tile * TILE_Q >= q_len:
        return
    seq_len = tl.load(seq_lens + request)
    # Rows are (token, head-in-group) pairs: TILE_Q tokens x GROUP heads, padded to BLOCK_M.
    r = tl.arange(0, BLOCK_M)
    token = tile * TILE_Q + r // GROUP
    head = kv_head * GROUP + r % GROUP
    row_ok = (r < TILE_Q * GROUP) & (token < q_len)
    row_pos = seq_len - q_len + token  # each row's position in the context
    d = tl.arange(0, BLOCK_D)
    in_dim = d < HEAD_DIM
    q_ptr = query + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    last_pos = tl.minimum(seq_len - q_len + (tile + 1) * TILE_Q, seq_len)  # causal horizon
    last_block = tl.cdiv(last_pos, BLOCK_SIZE)
    acc, _, l_i = _attend_blocks(
        q_ptr,
        row_pos,
        row_ok,
        k_cache,
        v_cache,
        block_tables + request * stride_bt,
        0,
        last_block,
        seq_len,
        scale,
        NUM_KV_HEADS,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_SIZE,
        BLOCK_M,
        kv_head,
        NATIVE_DOT,
    )
    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = out + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, result.to(out.dtype.element_ty), mask=row_ok[:, None] & in_dim[None, :])


def _native_dot(k_cache: torch.Tensor) -> bool:
    return k_cache.is_cuda and k_cache.dtype in (torch.float16, torch.bfloat16)


def _rows(tile_q: int, group: int) -> int:
    """tl.dot wants at least 16 rows, and tile shapes are powers of two."""
    return max(16, triton.next_power_of_2(tile_q * group))


def attention_constants(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_query_len: int,
    native_dot: bool,
) -> dict[str, int | bool]:
    """The compile-time constants `paged_attention` launches its kernel with."""
    group = num_heads // num_kv_heads
    tile_q = max(1, min(triton.next_power_of_2(max_query_len), max(1, 64 // group)))
    return dict(
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        TILE_Q=tile_q,
        BLOCK_M=_rows(tile_q, group),
        NATIVE_DOT=native_dot,
    )


def paged_attention(
    query,
    k_cache,
    v_cache,
    block_tables,
    query_start_loc,
    seq_lens,
    scale: float,
    max_query_len: int,
    out=None,
) -> torch.Tensor:
    """query [tokens, heads, dim] -> [tokens, heads, dim]; see `reference.py`."""
    tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    if tokens == 0:
        return out
    constants = attention_constants(
        num_heads, num_kv_heads, head_dim, block_size, max_query_len, _native_dot(k_cache)
    )
    grid = (len(seq_lens), num_kv_heads, triton.cdiv(max_query_len, constants["TILE_Q"]))
    _paged_attention_kernel[grid](
        query,
        out,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        **constants,
    )
    return out


@triton.jit
def _decode_split_kernel(
    query,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale,
    part_acc,
    part_m,
    part_l,
    stride_qt,
    stride_qh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + request)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    # Each request cuts its own context: the launch depends on no context length, so a
    # CUDA graph captured once replays for any.
    per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP
    head = kv_head * GROUP + r
    d = tl.arange(0, BLOCK_D)
    q_ptr = query + request * stride_qt + head[:, None] * stride_qh + d[None, :]
    row_pos = tl.zeros([BLOCK_M], dtype=tl.int32) + seq_len - 1  # a decode sees everything
    acc, m_i, l_i = _attend_blocks(
        q_ptr,
        row_pos,
        row_ok,
        k_cache,
        v_cache,
        block_tables + request * stride_bt,
        first,
        last,
        seq_len,
        scale,
        NUM_KV_HEADS,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_SIZE,
        BLOCK_M,
        kv_head,
        NATIVE_DOT,
    )
    base = (request * NUM_KV_HEADS + kv_head) * NUM_SPLITS + split
    tl.store(part_m + base * BLOCK_M + r, m_i)
    tl.store(part_l + base * BLOCK_M + r, l_i)
    tl.store(part_acc + (base * BLOCK_M + r)[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def _decode_merge_kernel(
    out,
    part_acc,
    part_m,
    part_l,
    stride_ot,
    stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    base = (request * NUM_KV_HEADS + kv_head) * NUM_SPLITS
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(part_m + (base + s) * BLOCK_M + r))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        weight = tl.exp(tl.load(part_m + (base + s) * BLOCK_M + r) - m_safe)
        l_all += weight * tl.load(part_l + (base + s) * BLOCK_M + r)
        rows = ((base + s) * BLOCK_M + r)[:, None] * BLOCK_D + d[None, :]
        acc += weight[:, None] * tl.load(part_acc + rows)
    result = acc / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
    head = kv_head * GROUP + r
    ok = (r < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    o_ptr = out + request * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, result.to(out.dtype.element_ty), mask=ok)


def merge_constants(
    num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int
) -> dict[str, int]:
    """The compile-time constants of `paged_decode`'s merge kernel; its split kernel
    takes these and BLOCK_SIZE and NATIVE_DOT."""
    group = num_heads // num_kv_heads
    return dict(
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=_rows(1, group),
        NUM_SPLITS=num_splits,
    )


def paged_decode(
    query,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale: float,
    num_splits: int,
    out=None,
) -> torch.Tensor:
    """Decode only (one query token per request, query [requests, heads, dim]), with
    each request's context cut into `num_splits` equal segments attended in parallel."""
    requests, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    if requests == 0:
        return out
    merge = merge_constants(num_heads, num_kv_heads, head_dim, num_splits)
    shape = (requests, num_kv_heads, num_splits, merge["BLOCK_M"])
    part_m = torch.empty(shape, dtype=torch.float32, device=query.device)
    part_l = torch.empty(shape, dtype=torch.float32, device=query.device)
    part_acc = torch.empty((*shape, merge["BLOCK_D"]), dtype=torch.float32, device=query.device)
    _decode_split_kernel[(requests, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale,
        part_acc,
        part_m,
        part_l,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        NATIVE_DOT=_native_dot(k_cache),
        **merge,
    )
    _decode_merge_kernel[(requests, num_kv_heads)](
        out, part_acc, part_m, part_l, out.stride(0), out.stride(1), **merge
    )
    return out

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

A token's result does not depend on what else is in the launch, nor on which of the two
ran it: every context is attended in segments of `SEGMENT_BLOCKS` blocks from its first
block (online softmax within a segment), the segments' partial results merged in order
by one function (`_merge`), and every launch's tiles have the same shape (`TILE_Q`
tokens whatever the batch's longest query), so each row goes through the same
arithmetic: a prompt's token computed in a whole prompt, in a chunk after a prefix-cache
hit or recomputed after preemption gets the bits it got as a decode beside any others.
Blocks and segments past a row's own position (a tile's later rows see more) add exact
zeros.

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

SEGMENT_BLOCKS = 16  # blocks per segment (256 tokens at 16 per block)


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
def _nothing_seen(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (acc, max, sum) of rows that have attended no key yet."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    return (
        acc,
        tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
        tl.zeros([BLOCK_M], dtype=tl.float32),
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
    acc, m_i, l_i = _nothing_seen(BLOCK_M, BLOCK_D)
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
def _merge(acc, m_i, l_i, seg_acc, seg_m, seg_l):
    """The running (acc, max, sum) with the next segment's: the one place segments are
    merged, in the paged kernel and the split kernel's merge alike."""
    m_new = tl.maximum(m_i, seg_m)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    beta = tl.exp(seg_m - m_safe)
    return acc * alpha[:, None] + seg_acc * beta[:, None], m_new, l_i * alpha + seg_l * beta


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
    SEGMENT_BLOCKS: tl.constexpr,
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
    acc, m_i, l_i = _nothing_seen(BLOCK_M, BLOCK_D)
    for first in range(0, last_block, SEGMENT_BLOCKS):
        seg_acc, seg_m, seg_l = _attend_blocks(
            q_ptr,
            row_pos,
            row_ok,
            k_cache,
            v_cache,
            block_tables + request * stride_bt,
            first,
            tl.minimum(first + SEGMENT_BLOCKS, last_block),
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
        acc, m_i, l_i = _merge(acc, m_i, l_i, seg_acc, seg_m, seg_l)
    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = out + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, result.to(out.dtype.element_ty), mask=row_ok[:, None] & in_dim[None, :])


def _native_dot(k_cache: torch.Tensor) -> bool:
    return k_cache.is_cuda and k_cache.dtype in (torch.float16, torch.bfloat16)


def _tile(group: int) -> tuple[int, int]:
    """(TILE_Q, BLOCK_M) of every launch of both decode paths for a GQA group: ~64 rows of
    (token, head) pairs (tl.dot wants at least 16; tile shapes are powers of two). One
    shape per model, since a tile's shape is a row's arithmetic."""
    tile_q = max(1, 64 // group)
    return tile_q, max(16, triton.next_power_of_2(tile_q * group))


def attention_constants(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, native_dot: bool
) -> dict[str, int | bool]:
    """The compile-time constants `paged_attention` launches its kernel with: one set per
    model and dtype, whatever the batch (a tile's shape is a row's arithmetic)."""
    group = num_heads // num_kv_heads
    tile_q, block_m = _tile(group)
    return dict(
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        TILE_Q=tile_q,
        BLOCK_M=block_m,
        SEGMENT_BLOCKS=SEGMENT_BLOCKS,
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
        num_heads, num_kv_heads, head_dim, block_size, _native_dot(k_cache)
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
    num_segments,
    stride_qt,
    stride_qh,
    stride_bt,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SEGMENT_BLOCKS: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq_len = tl.load(seq_lens + request)
    # Segments are counted over the block table's width, not this context's length, so
    # a CUDA graph captured once replays for any; those past the context stay empty.
    first = segment * SEGMENT_BLOCKS
    last = tl.minimum(first + SEGMENT_BLOCKS, tl.cdiv(seq_len, BLOCK_SIZE))
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
    base = (request * NUM_KV_HEADS + kv_head) * num_segments + segment
    tl.store(part_m + base * BLOCK_M + r, m_i)
    tl.store(part_l + base * BLOCK_M + r, l_i)
    tl.store(part_acc + (base * BLOCK_M + r)[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def _decode_merge_kernel(
    out,
    part_acc,
    part_m,
    part_l,
    num_segments,
    stride_ot,
    stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    request = tl.program_id(0)
    kv_head = tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    base = (request * NUM_KV_HEADS + kv_head) * num_segments
    acc, m_i, l_i = _nothing_seen(BLOCK_M, BLOCK_D)
    for s in range(0, num_segments):
        rows = (base + s) * BLOCK_M + r
        seg_acc = tl.load(part_acc + rows[:, None] * BLOCK_D + d[None, :])
        acc, m_i, l_i = _merge(
            acc, m_i, l_i, seg_acc, tl.load(part_m + rows), tl.load(part_l + rows)
        )
    result = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    head = kv_head * GROUP + r
    ok = (r < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    o_ptr = out + request * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr, result.to(out.dtype.element_ty), mask=ok)


def merge_constants(num_heads: int, num_kv_heads: int, head_dim: int) -> dict[str, int]:
    """The compile-time constants of `paged_decode`'s merge kernel; its split kernel
    takes these and BLOCK_SIZE, SEGMENT_BLOCKS and NATIVE_DOT. BLOCK_M is
    `paged_attention`'s, so a decode's dots have the shape they have there."""
    group = num_heads // num_kv_heads
    return dict(
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=_tile(group)[1],
    )


def decode_segments(block_tables: torch.Tensor) -> int:
    """How many segments `paged_decode` cuts the widest context of a table into."""
    return triton.cdiv(block_tables.shape[1], SEGMENT_BLOCKS)


def paged_decode(
    query,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    scale: float,
    out=None,
) -> torch.Tensor:
    """Decode only (one query token per request, query [requests, heads, dim]), each
    request's context cut into segments of `SEGMENT_BLOCKS` blocks attended in parallel,
    then merged: the bits `paged_attention` gives the same token."""
    requests, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query) if out is None else out
    if requests == 0:
        return out
    merge = merge_constants(num_heads, num_kv_heads, head_dim)
    segments = decode_segments(block_tables)
    shape = (requests, num_kv_heads, segments, merge["BLOCK_M"])
    part_m = torch.empty(shape, dtype=torch.float32, device=query.device)
    part_l = torch.empty(shape, dtype=torch.float32, device=query.device)
    part_acc = torch.empty((*shape, merge["BLOCK_D"]), dtype=torch.float32, device=query.device)
    _decode_split_kernel[(requests, num_kv_heads, segments)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale,
        part_acc,
        part_m,
        part_l,
        segments,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        SEGMENT_BLOCKS=SEGMENT_BLOCKS,
        NATIVE_DOT=_native_dot(k_cache),
        **merge,
    )
    _decode_merge_kernel[(requests, num_kv_heads)](
        out, part_acc, part_m, part_l, segments, out.stride(0), out.stride(1), **merge
    )
    return out

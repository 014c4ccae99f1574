"""The GPUs' matrix products, in Triton: activations [M, K] times a weight [N, K] that is
dense (in the activations' dtype) or group-quantized, 4-bit or 8-bit (dequantized inside
each tile), with fp32 accumulation, and a row's bits independent of M.

Every product a token passes through must give its row the same bits whatever else is
in the batch, or a greedy reply depends on what shared its steps and on how much of its
prompt the prefix cache held. cuBLAS picks its kernel (tile, split-K, summation order)
by M, so the dense layers go through here too.

A group-quantized weight is `GroupQuantized`'s layout (kubellm/runtime/model/quantized.py):
codes [N, K/2] uint8 with the even k in the low nibble (4-bit) or [N, K] int8 (8-bit), fp32
scales and offsets [N, K/group], `W = q * s + o`. A program owns a BLOCK_M x BLOCK_N tile
of the output and either all of K or one of its segments (`SEGMENT_K` inputs, in BLOCK_K
slices; BLOCK_K divides the group, so one scale per row per slice). Each segment is summed
into an accumulator of its own, then added to a total in K's order: in the program when it
has all of K, by `_sum_kernel` over the segments' programs when K is split (decode-sized
M). That is the same sequence of additions either way, rounded once to the output's dtype
at the end, and every tile is BLOCK_M rows whatever M is, so a row's result depends
neither on M nor on the split (split programs write fp32 partial sums, so it does not
depend on the order programs finish either). The pure-torch reference is
`quantized_gemm_reference` in reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SEGMENT_K = 512  # inputs per segment of K (a multiple of every BLOCK_K)
BLOCK_M = 64  # a tile's rows, whatever M is: a row's arithmetic follows the tile's shape
BLOCK_N = 64
DENSE_BLOCK_K = 64
SUM_BLOCK = 1024  # outputs per program of the split's sum


@triton.jit
def _gemm_kernel(
    x,
    weight,
    scales,
    offsets,
    out,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    WEIGHT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SEGMENT_K: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    # this tile's rows of x, and of the weight and its scales and offsets
    x_rows = x + rows[:, None] * stride_xm
    w_rows = weight + cols[:, None] * stride_wn
    s_rows, o_rows = scales + cols * stride_sn, offsets + cols * stride_sn
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * SEGMENT_K if SPLIT else 0  # SPLIT: a program per segment
    last = tl.minimum(first + SEGMENT_K, K) if SPLIT else K
    for segment in range(first, last, SEGMENT_K):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(segment, tl.minimum(segment + SEGMENT_K, K), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K  # a dense weight's K need not be a multiple of BLOCK_K
            a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = _weight_tile(
                w_rows, s_rows, o_rows, col_ok, ks, k_ok, k0, WEIGHT, GROUP, BLOCK_N, BLOCK_K
            )
            if NATIVE_DOT:
                acc += tl.dot(a, tl.trans(w.to(a.dtype)))
            else:
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        total += acc
    tile = out + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(tile, total.to(out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_tile(
    w_rows,
    s_rows,
    o_rows,
    col_ok,
    ks,
    k_ok,
    k0,
    WEIGHT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The [BLOCK_N, BLOCK_K] tile of inputs `ks` (from k0) of the weight rows `w_rows`
    (their scales' and offsets' rows `s_rows`, `o_rows`): as stored (dense), or
    `q * s + o` in fp32."""
    if WEIGHT == "dense":
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    else:
        if WEIGHT == "int4":
            half = tl.arange(0, BLOCK_K // 2)
            packed = tl.load(
                w_rows + (k0 // 2 + half)[None, :],
                mask=col_ok[:, None],
                other=0,
            )
            q = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))
        else:
            q = tl.load(w_rows + ks[None, :], mask=col_ok[:, None], other=0)
        group = k0 // GROUP
        s = tl.load(s_rows + group, mask=col_ok, other=0.0)
        o = tl.load(o_rows + group, mask=col_ok, other=0.0)
        w = q.to(tl.float32) * s[:, None] + o[:, None]
    return w


@triton.jit
def _sum_kernel(partial, out, size, SPLITS, BLOCK: tl.constexpr):
    """out = the programs' totals added in K's order (from zero, as a program adds its
    segments), in out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, SPLITS):
        total += tl.load(partial + split * size + offs, mask=ok, other=0.0)
    tl.store(out + offs, total.to(out.dtype.element_ty), mask=ok)


def gemm_constants(
    weight: str, group_size: int | None, native_dot: bool, split: bool
) -> dict[str, int | bool | str]:
    """The compile-time constants a product launches its kernel with: two sets (split or
    not) per weight form, group size and dtype, whatever M. `group_size`: None for a
    dense weight."""
    block_k = DENSE_BLOCK_K if group_size is None else min(group_size, 64)
    return dict(
        WEIGHT=weight,
        GROUP=group_size or block_k,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=block_k,
        SEGMENT_K=SEGMENT_K,
        NATIVE_DOT=native_dot,
        SPLIT=split,
    )


def split_k(rows: int, columns: int, inputs: int, sms: int) -> bool:
    """Whether K's segments get a program each: for decode-sized M (one tile of rows)
    whose output tiles would leave the GPU under two programs per SM, when K has
    several segments."""
    tiles = triton.cdiv(columns, BLOCK_N)
    return rows <= BLOCK_M and tiles < 2 * sms and inputs > SEGMENT_K


def dense_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    split: bool | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight.T (+ bias) -> [M, N] in x's dtype; `split` as for `w4a16`."""
    weight = weight.contiguous()
    y = _gemm(x, weight, weight, weight, "dense", None, weight.shape[0], split)
    return y if bias is None else y.add_(bias)


def quantized_gemm(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    split: bool | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T for W = q * s + o [N, K] -> [M, N] in x's dtype; `split`: a
    program per segment of K (default `split_k`'s choice; the result is the same)."""
    form = {4: "int4", 8: "int8"}[bits]
    return _gemm(x, codes, scales, offsets, form, group_size, codes.shape[0], split)


def _gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    form: str,
    group_size: int | None,
    columns: int,
    split: bool | None,
) -> torch.Tensor:
    rows, inputs = x.shape
    native = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    if split is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split = split_k(rows, columns, inputs, sms)
    constants = gemm_constants(form, group_size, native, split)
    block_k = constants["BLOCK_K"]
    if group_size is not None and (inputs % block_k or group_size % block_k):
        raise ValueError(f"K {inputs} and the group must split into slices of {block_k}")
    splits = triton.cdiv(inputs, SEGMENT_K) if split else 1
    x = x.contiguous()
    out = torch.empty(rows, columns, dtype=x.dtype, device=x.device)
    # split: each segment's fp32 sums, added by `_sum_kernel`; else the output itself
    partial = (
        torch.empty(splits, rows, columns, dtype=torch.float32, device=x.device) if split else out
    )
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(columns, BLOCK_N), splits)
    _gemm_kernel[grid](
        x,
        weight,
        scales,
        offsets,
        partial,
        rows,
        columns,
        inputs,
        x.stride(0),
        weight.stride(0),
        scales.stride(0),
        **constants,
    )
    if not split:
        return out
    size = rows * columns
    _sum_kernel[(triton.cdiv(size, SUM_BLOCK),)](partial, out, size, splits, BLOCK=SUM_BLOCK)
    return out

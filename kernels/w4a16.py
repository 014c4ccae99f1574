"""W4A16 GEMM: activations [M, K] times a group-quantized 4-bit weight [N, K], the weight
dequantized inside each tile, fp32 accumulation, split-K for decode-sized M.

The weight is `GroupQuantized`'s layout (kubellm/runtime/model/quantized.py): codes uint8
[N, K/2] with the even k in the low nibble, fp32 scales and offsets [N, K/group],
`W = q * s + o`. A program owns a BLOCK_M x BLOCK_N tile of the output and either all
of K or one of its segments (`SEGMENT_K` inputs, in BLOCK_K slices; BLOCK_K divides the
group, so one scale per row per slice). Each segment is summed into an accumulator of
its own, then added to a total in K's order: in the program when it has all of K, by
`_sum_kernel` over the segments' programs when K is split (decode-sized M). That is the
same sequence of additions either way, and every tile is BLOCK_M rows whatever M is, so
a row's result depends neither on M nor on the split (split programs write fp32 partial
sums, so it does not depend on the order programs finish either). The pure-torch reference is
`w4a16_reference` in reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SEGMENT_K = 512  # inputs per segment of K (a multiple of every BLOCK_K)
BLOCK_M = 64  # a tile's rows, whatever M is: a row's arithmetic follows the tile's shape
BLOCK_N = 64
SUM_BLOCK = 1024  # outputs per program of the split's sum


@triton.jit
def _w4a16_kernel(
    x,
    codes,
    scales,
    offsets,
    partial,
    M,
    N,
    K,
    stride_xm,
    stride_cn,
    stride_sn,
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
    half = tl.arange(0, BLOCK_K // 2)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * SEGMENT_K if SPLIT else 0  # SPLIT: a program per segment
    last = tl.minimum(first + SEGMENT_K, K) if SPLIT else K
    for segment in range(first, last, SEGMENT_K):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(segment, tl.minimum(segment + SEGMENT_K, K), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(
                x + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None], other=0.0
            )
            packed = tl.load(
                codes + cols[:, None] * stride_cn + (k0 // 2 + half)[None, :],
                mask=col_ok[:, None],
                other=0,
            )
            q = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))
            group = k0 // GROUP
            s = tl.load(scales + cols * stride_sn + group, mask=col_ok, other=0.0)
            o = tl.load(offsets + cols * stride_sn + group, mask=col_ok, other=0.0)
            w = q.to(tl.float32) * s[:, None] + o[:, None]  # [BLOCK_N, BLOCK_K]
            if NATIVE_DOT:
                acc += tl.dot(a, tl.trans(w.to(a.dtype)))
            else:
                acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
        total += acc
    out = partial + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, total, mask=row_ok[:, None] & col_ok[None, :])


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


def w4a16_constants(group_size: int, native_dot: bool, split: bool) -> dict[str, int | bool]:
    """The compile-time constants `w4a16` launches its kernel with: two sets (split or
    not) per group size and dtype, whatever M."""
    return dict(
        GROUP=group_size,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=min(group_size, 64),
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


def w4a16(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    split: bool | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T for W = q * s + o [N, K] -> [M, N] in x's dtype; `split`: a
    program per segment of K (default `split_k`'s choice; the result is the same)."""
    rows, inputs = x.shape
    columns = codes.shape[0]
    native = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    if split is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split = split_k(rows, columns, inputs, sms)
    constants = w4a16_constants(group_size, native, split)
    if inputs % constants["BLOCK_K"] or group_size % constants["BLOCK_K"]:
        raise ValueError(f"K {inputs} must split into slices of {constants['BLOCK_K']}")
    splits = triton.cdiv(inputs, SEGMENT_K) if split else 1
    x = x.contiguous()
    partial = torch.empty(splits, rows, columns, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(columns, BLOCK_N), splits)
    _w4a16_kernel[grid](
        x,
        codes,
        scales,
        offsets,
        partial,
        rows,
        columns,
        inputs,
        x.stride(0),
        codes.stride(0),
        scales.stride(0),
        **constants,
    )
    if splits == 1:
        return partial[0].to(x.dtype)
    out = torch.empty(rows, columns, dtype=x.dtype, device=x.device)
    size = rows * columns
    _sum_kernel[(triton.cdiv(size, SUM_BLOCK),)](partial, out, size, splits, BLOCK=SUM_BLOCK)
    return out

"""W4A16 GEMM: activations [M, K] times a group-quantized 4-bit weight [N, K], the weight
dequantized inside each tile, fp32 accumulation, split-K for decode-sized M.

The weight is `GroupQuantized`'s layout (kubellm/runtime/model/quantized.py): codes uint8
[N, K/2] with the even k in the low nibble, fp32 scales and offsets [N, K/group],
`W = q * s + o`. A program owns a BLOCK_M x BLOCK_N tile of the output and every
SPLIT_K-th BLOCK_K slice of K (BLOCK_K divides the group, so one scale per row per
slice); split programs write fp32 partial sums that the host adds up, so the result
does not depend on the order programs finish. The pure-torch reference is
`w4a16_reference` in reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    SPLIT_K,
    stride_xm,
    stride_cn,
    stride_sn,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    half = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(split, K // BLOCK_K, SPLIT_K):
        k0 = tile * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None], other=0.0)
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
    out = partial + split * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def w4a16_constants(rows: int, group_size: int, native_dot: bool) -> dict[str, int | bool]:
    """The compile-time constants `w4a16` launches its kernel with."""
    return dict(
        GROUP=group_size,
        BLOCK_M=16 if rows <= 16 else 64,
        BLOCK_N=64,
        BLOCK_K=min(group_size, 64),
        NATIVE_DOT=native_dot,
    )


def split_k(rows: int, columns: int, inputs: int, block_k: int, sms: int) -> int:
    """Decode-sized M leaves most SMs idle with one program per output tile: split K
    until there are about two programs per SM (at most one K slice each)."""
    tiles = triton.cdiv(rows, 16 if rows <= 16 else 64) * triton.cdiv(columns, 64)
    return max(1, min(inputs // block_k, (2 * sms) // tiles))


def w4a16(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group_size: int,
    splits: int | None = None,
) -> torch.Tensor:
    """x [M, K] @ W.T for W = q * s + o [N, K] -> [M, N] in x's dtype."""
    rows, inputs = x.shape
    columns = codes.shape[0]
    native = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    constants = w4a16_constants(rows, group_size, native)
    if inputs % constants["BLOCK_K"] or group_size % constants["BLOCK_K"]:
        raise ValueError(f"K {inputs} must split into slices of {constants['BLOCK_K']}")
    if splits is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        splits = split_k(rows, columns, inputs, constants["BLOCK_K"], sms)
    x = x.contiguous()
    partial = torch.empty(splits, rows, columns, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, constants["BLOCK_M"]), triton.cdiv(columns, 64), splits)
    _w4a16_kernel[grid](
        x,
        codes,
        scales,
        offsets,
        partial,
        rows,
        columns,
        inputs,
        splits,
        x.stride(0),
        codes.stride(0),
        scales.stride(0),
        **constants,
    )
    return partial.sum(0).to(x.dtype)

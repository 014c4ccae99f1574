"""kubellm's CPU kernel for group-quantized weights (`cpu_qgemm.c`, in the library
`cpu_library` builds), called with ctypes. The pure-torch reference is
`cpu_qgemm_reference`."""

from __future__ import annotations

import ctypes
import functools

import torch

from kubellm.kernels.cpu_library import library

BLOCK = 32  # inputs per activation scale; K and the group size must be multiples of it


@functools.cache
def _function():
    function = library().kubellm_qgemm
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [
        pointer,
        i64,
        i64,
        pointer,
        ctypes.c_int,
        pointer,
        pointer,
        i64,
        i64,
        pointer,
        ctypes.c_int,
    ]
    function.restype = ctypes.c_int
    return function


@functools.cache
def _dequantize():
    function = library().kubellm_dequantize
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [
        pointer,
        ctypes.c_int,
        pointer,
        pointer,
        i64,
        i64,
        i64,
        pointer,
        ctypes.c_int,
        ctypes.c_int,
    ]
    function.restype = None
    return function


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight [N, K] of cpu_qgemm's operands in fp32 (`GroupQuantized.dequantize`'s
    values, bit for bit) or bf16 (those values rounded as `.to(torch.bfloat16)` rounds
    them, without the fp32 matrix in between)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize makes float32 or bfloat16, not {dtype}")
    rows = codes.shape[0]
    inputs = codes.shape[1] * 8 // bits
    out = torch.empty(rows, inputs, dtype=dtype)
    _dequantize()(
        codes.data_ptr(),
        bits,
        scales.data_ptr(),
        offsets.data_ptr(),
        rows,
        inputs,
        group_size,
        out.data_ptr(),
        dtype == torch.bfloat16,
        torch.get_num_threads(),
    )
    return out


def cpu_qgemm(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """x [M, K] (fp32) @ W.T -> fp32 [M, N], W [N, K] = q * s + o per group: codes uint8
    [N, K/2] (4-bit, the even k in the low nibble) or int8 [N, K]; scales and offsets
    fp16 [N, K / group_size], offsets None for none (zero offsets' result, faster). Each
    row of x is rounded to int8 per 32 inputs."""
    x = x.float().contiguous()
    rows, inputs = x.shape
    outputs = codes.shape[0]
    out = torch.empty(rows, outputs)
    status = _function()(
        x.data_ptr(),
        rows,
        inputs,
        codes.data_ptr(),
        bits,
        scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(),
        outputs,
        group_size,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"cpu_qgemm: no memory for the int8 copy of x {list(x.shape)}")
    return out

"""A decoder layer's small fp32 operations on CPU (`cpu_ops.c`, in the library
`cpu_library` builds), one ctypes call each: RMSNorm with its residual add, rotary
embeddings in place, SiLU(gate) * up, and the paged KV cache's writes and decode
attention. Their torch forms: `TorchOps` (runtime/model/layer_ops.py) and the KV and
attention references in kernels/reference.py. Every tensor is fp32 on the host, but for
the KV cache, which may also be fp16 (half the bytes a decode step reads).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kubellm.kernels.cpu_library import library

MAX_HEAD_DIM = 256  # decode attention's head dim: a multiple of 8, at most this

_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "kubellm_add_rms_norm": ([_P, _P, _P, _I64, _I64, _F32, _P, _INT], None),
    "kubellm_rotate": ([_P, _I64, _I64, _I64, _I64, _P, _P, _INT], None),
    "kubellm_silu_and_mul": ([_P, _I64, _I64, _P, _INT], None),
    "kubellm_write_kv": ([_P, _I64, _P, _I64, _P, _I64, _I64, _P, _I64, _INT], None),
    "kubellm_decode_attention": (
        [_P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _INT, _P, _P, _P, _I64, _I64, _F32, _P, _INT],
        ctypes.c_int,
    ),
}


@functools.cache
def _function(name: str):
    function = getattr(library(), name)
    function.argtypes, function.restype = _SIGNATURES[name]
    return function


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x [M, H]; the sum is written
    into `residual` (with none: RMSNorm(x) * weight, x)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, size = x.shape
    _function("kubellm_add_rms_norm")(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        rows,
        size,
        eps,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out, x if residual is None else residual


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [tokens, heads, dim] (heads contiguous, token rows any distance apart) rotated
    in place by cos and signed sin [tokens, 1, dim] (contiguous); returns x."""
    tokens, heads, dim = x.shape
    assert x.stride(1) == dim and x.stride(2) == 1 and cos.is_contiguous()
    _function("kubellm_rotate")(
        x.data_ptr(),
        tokens,
        heads,
        dim,
        x.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        torch.get_num_threads(),
    )
    return x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [M, 2I] = [gate | up] -> [M, I]."""
    x = x.contiguous()
    rows, width = x.shape
    out = x.new_empty(rows, width // 2)
    _function("kubellm_silu_and_mul")(
        x.data_ptr(), rows, width // 2, out.data_ptr(), torch.get_num_threads()
    )
    return out


def _rows_of_heads(t: torch.Tensor) -> None:
    assert t.stride(-1) == 1 and t.stride(-2) == t.shape[-1], "heads must be contiguous"


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """key, value [tokens, kv_heads, dim] into kv_cache [2, blocks, block_size, kv_heads,
    dim] (fp32 or fp16: `half_cache`) at their int64 slots (block * block_size + offset;
    -1: skipped)."""
    _rows_of_heads(key), _rows_of_heads(value)
    assert kv_cache.is_contiguous() and slots.dtype == torch.int64
    _, blocks, block_size, kv_heads, dim = kv_cache.shape
    _function("kubellm_write_kv")(
        key.data_ptr(),
        key.stride(0),
        value.data_ptr(),
        value.stride(0),
        slots.data_ptr(),
        key.shape[0],
        kv_heads * dim,
        kv_cache.data_ptr(),
        blocks * block_size,
        half_cache(kv_cache),
    )


def half_cache(kv_cache: torch.Tensor) -> bool:
    """Whether the C kernels read and write this KV cache as fp16 (else fp32)."""
    assert kv_cache.dtype in (torch.float32, torch.float16), kv_cache.dtype
    return kv_cache.dtype == torch.float16


def attends(head_dim: int) -> bool:
    """Whether `decode_attention` takes heads of this size."""
    return head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """One-token attention: for each request r, query row rows[r] ([tokens, heads, dim],
    heads contiguous) over its seq_lens[r] positions in the blocks block_tables[r] of
    kv_cache, into the same row of out ([tokens, heads, dim], contiguous). rows,
    seq_lens and block_tables int64."""
    _, heads, dim = query.shape
    _, blocks, block_size, kv_heads, _ = kv_cache.shape
    _rows_of_heads(query)
    assert attends(dim) and out.is_contiguous() and kv_cache.is_contiguous()
    assert block_tables.stride(1) == 1 and rows.is_contiguous() and seq_lens.is_contiguous()
    status = _function("kubellm_decode_attention")(
        query.data_ptr(),
        query.stride(0),
        heads,
        kv_cache.data_ptr(),
        blocks,
        block_size,
        kv_heads,
        dim,
        half_cache(kv_cache),
        rows.data_ptr(),
        seq_lens.data_ptr(),
        block_tables.data_ptr(),
        block_tables.stride(0),
        len(rows),
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("decode_attention: no memory for the attention scores")

"""A decoder layer's whole decode step in one call (`cpu_layer.c`, in the library
`cpu_library` builds): the structures that describe a layer once and a step once, and
the call. The pieces are those of `cpu_qgemm` and `cpu_ops`, so the output is theirs,
bit for bit; what it saves is the host work between them."""

from __future__ import annotations

import ctypes
import functools

import torch

from kubellm.kernels.cpu_library import library

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class QWeightView(ctypes.Structure):
    """kubellm_qweight, a view of a `QuantizedWeight`'s storage for the C layer: codes,
    fp16 scales and offsets [outputs, inputs / group] (offsets NULL: none)."""

    _fields_ = [
        ("codes", _P),
        ("scales", _P),
        ("offsets", _P),
        ("outputs", _I64),
        ("inputs", _I64),
        ("group", _I64),
        ("bits", ctypes.c_int),
    ]


class Layer(ctypes.Structure):
    """kubellm_layer: what a layer's decode step reads that does not change."""

    _fields_ = [
        ("qkv", QWeightView),
        ("o", QWeightView),
        ("gate_up", QWeightView),
        ("down", QWeightView),
        ("qkv_bias", _P),
        ("input_norm", _P),
        ("post_attention_norm", _P),
        ("eps", _F32),
        ("scale", _F32),
        ("hidden", _I64),
        ("heads", _I64),
        ("kv_heads", _I64),
        ("head_dim", _I64),
    ]


class DecodeStep(ctypes.Structure):
    """kubellm_decode_step: one step's requests (one token each), for every layer."""

    _fields_ = [
        ("tokens", _I64),
        ("cos", _P),
        ("sin", _P),
        ("slots", _P),
        ("rows", _P),
        ("seq_lens", _P),
        ("block_tables", _P),
        ("table_stride", _I64),
        ("blocks", _I64),
        ("block_size", _I64),
        ("half_kv", ctypes.c_int),
    ]


@functools.cache
def _function():
    function = library().kubellm_decode_layer
    function.argtypes = [
        ctypes.POINTER(Layer),
        ctypes.POINTER(DecodeStep),
        _P,
        _P,
        _P,
        _P,
        ctypes.c_int,
    ]
    function.restype = ctypes.c_int
    return function


def decode_layer(
    layer: Layer,
    step: DecodeStep,
    kv_cache: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer's MLP output for x [tokens, hidden], the residual stream): with a
    residual, the attention output and x are summed into it in place; with none (the
    first layer), into x. Every tensor fp32 and contiguous; the step's and layer's
    tensors must outlive the call."""
    out = torch.empty_like(x)
    status = _function()(
        ctypes.byref(layer),
        ctypes.byref(step),
        kv_cache.data_ptr(),
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"decode_layer: no memory for the scratch of {x.shape[0]} tokens")
    return out, x if residual is None else residual

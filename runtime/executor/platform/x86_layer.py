"""A decoder layer's decode steps in one call of kubellm's C kernels (`kernels/cpu_layer.py`),
where the layer's every piece already runs in them: fp32 on CPU with one rank, the four
products' weights in the CPU kernel's storage (`QgemmProduct`, no act-order permutation)
and the `cpu` attention backend. A step takes it when every request decodes
(one new token); other steps, and other layers, run the layer's modules. Either way the
same kernels compute the same values (tests/runtime/test_fused_layer.py checks it bit for
bit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kubellm.kernels import cpu_layer, cpu_ops
from kubellm.runtime.executor.platform.cpu_attention import CpuAttentionBackend
from kubellm.runtime.executor.platform.cpu_products import QgemmProduct
from kubellm.runtime.model.attention import AttentionMetadata
from kubellm.runtime.model.quantized import QuantizedWeight
from kubellm.runtime.model.rope import RopeTables


def _weight(linear) -> cpu_layer.QWeightView | None:
    weight = linear.weight
    if not isinstance(weight, QuantizedWeight) or not isinstance(weight.product, QgemmProduct):
        return None
    if weight.perm is not None:
        return None
    codes, scales, offsets = weight.product.operands()
    rows, inputs = weight.shape
    offsets_at = None if offsets is None else offsets.data_ptr()
    layout = weight.product.layout
    return cpu_layer.QWeightView(
        codes.data_ptr(),
        scales.data_ptr(),
        offsets_at,
        rows,
        inputs,
        layout.group_size,
        layout.bits,
    )


def whole_decode(layer) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """A `DecoderLayer`'s decode step as one C call (its `whole_decode`); None where
    some piece of the layer cannot run in it."""
    fused = describe(layer)
    return None if fused is None else functools.partial(_decode, fused)


def _decode(fused: cpu_layer.Layer, step: FusedStep, kv_cache, x, residual):
    return cpu_layer.decode_layer(fused, step.struct, kv_cache, x, residual)


def describe(layer) -> cpu_layer.Layer | None:
    """The C description of a `DecoderLayer` whose decode steps can run in one call;
    None where some piece cannot. It points into the layer's tensors, which must stay."""
    attention, mlp = layer.self_attn, layer.mlp
    if not isinstance(attention.backend, CpuAttentionBackend):
        return None
    if attention.o_proj.tp.size != 1 or not cpu_ops.attends(attention.head_dim):
        return None
    weights = [
        _weight(m) for m in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
    ]
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if None in weights or any(n.weight.dtype != torch.float32 for n in norms):
        return None
    bias = attention.qkv_proj.bias
    return cpu_layer.Layer(
        *weights,
        None if bias is None else bias.data_ptr(),
        norms[0].weight.data_ptr(),
        norms[1].weight.data_ptr(),
        norms[0].eps,
        attention.scale,
        norms[0].weight.shape[0],
        attention.num_heads,
        attention.num_kv_heads,
        attention.head_dim,
    )


@dataclass
class FusedStep:
    """A decode step's description for every fused layer, and the tensors it points into."""

    struct: cpu_layer.DecodeStep
    tensors: tuple[torch.Tensor, ...]


def fused_step(
    rope: RopeTables, meta: AttentionMetadata, kv_cache: torch.Tensor, tokens: int
) -> FusedStep | None:
    """The step as fused layers read it; None unless every request decodes."""
    decodes = meta.one_token_requests
    if decodes is None or len(decodes.requests) != tokens:
        return None
    _, blocks, block_size, _, _ = kv_cache.shape
    tensors = (
        rope.cos,
        rope.sin,
        meta.slot_mapping,
        decodes.rows,
        decodes.seq_lens,
        decodes.block_tables,
    )
    struct = cpu_layer.DecodeStep(
        tokens,
        *(t.data_ptr() for t in tensors),
        decodes.block_tables.stride(0),
        blocks,
        block_size,
        cpu_ops.half_cache(kv_cache),
    )
    return FusedStep(struct, tensors)

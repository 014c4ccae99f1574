"""A decode layer in one C call against the same layer composed of the separate calls
(`CpuOps`, `cpu_qgemm`, `cpu_ops.write_kv` / `decode_attention`), bit for bit: random
group-quantized weights (4-bit and 8-bit, groups of 32 and 64), a QKV bias or none, grouped
heads, 1-5 requests over scattered blocks, with a residual stream and without (the first
layer)."""

from __future__ import annotations

import pytest
import torch

from kubellm.kernels import cpu_layer, cpu_library, cpu_ops
from kubellm.kernels.cpu_qgemm import cpu_qgemm
from kubellm.runtime.executor.platform.x86 import CpuOps
from kubellm.runtime.model.rope import RopeTables
from tests.helpers import random_group_quantized

pytestmark = pytest.mark.skipif(
    cpu_library.unavailable() is not None, reason="needs AVX2, FMA, F16C and a C compiler"
)

HIDDEN, HEADS, KV_HEADS, DIM, INNER, BLOCK = 64, 4, 2, 16, 96, 4


def _random(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _quantized(rows: int, cols: int, bits: int, group: int, seed: int):
    """(codes, fp16 scales, fp16 offsets, bits, group) of a random weight."""
    weight = random_group_quantized(rows, cols, bits, group, seed)
    return weight.codes, weight.scales.half(), weight.offsets.half(), bits, group


def _struct(weight) -> cpu_layer.QWeightView:
    codes, scales, offsets, bits, group = weight
    inputs = codes.shape[1] * 8 // bits
    return cpu_layer.QWeightView(
        codes.data_ptr(), scales.data_ptr(), offsets.data_ptr(), codes.shape[0], inputs, group, bits
    )


def _composed(weights, bias, norms, x, residual, rope, kv_cache, slots, lens, tables):
    """The layer as the model's modules run it with `CpuOps` and the cpu backend."""
    qkv_w, o_w, gate_up_w, down_w = weights
    q_size, kv_size = HEADS * DIM, KV_HEADS * DIM
    normed, residual = CpuOps.add_rms_norm(x, residual, norms[0], 1e-5)
    qkv = cpu_qgemm(normed, *qkv_w)
    if bias is not None:
        qkv = qkv + bias
    qk = CpuOps.rotate(qkv[:, : q_size + kv_size].view(-1, HEADS + KV_HEADS, DIM), rope)
    q, k = qk.split([HEADS, KV_HEADS], dim=1)
    v = qkv[:, q_size + kv_size :].view(-1, KV_HEADS, DIM)
    cpu_ops.write_kv(k, v, kv_cache, slots)
    attended = torch.empty(q.shape)
    cpu_ops.decode_attention(q, kv_cache, torch.arange(len(x)), lens, tables, DIM**-0.5, attended)
    projected = cpu_qgemm(attended.reshape(-1, q_size), *o_w)
    normed, residual = CpuOps.add_rms_norm(projected, residual, norms[1], 1e-5)
    activated = CpuOps.silu_and_mul(cpu_qgemm(normed, *gate_up_w))
    return cpu_qgemm(activated, *down_w), residual


@pytest.mark.parametrize(
    ("requests", "bits", "bias", "first_layer", "cache_dtype"),
    [
        (1, (4, 4, 4, 4), False, False, torch.float32),
        (3, (8, 4, 4, 8), True, False, torch.float16),
        (5, (4, 8, 4, 4), True, True, torch.float32),
        (2, (4, 4, 8, 4), False, True, torch.float16),
    ],
)
def test_decode_layer_equals_the_separate_calls(requests, bits, bias, first_layer, cache_dtype):
    q_size, kv_size = HEADS * DIM, KV_HEADS * DIM
    shapes = [
        (q_size + 2 * kv_size, HIDDEN, 32),
        (HIDDEN, q_size, 64),
        (2 * INNER, HIDDEN, 32),
        (HIDDEN, INNER, 32),
    ]
    weights = [_quantized(n, k, b, g, seed=i) for i, ((n, k, g), b) in enumerate(zip(shapes, bits))]
    qkv_bias = _random(q_size + 2 * kv_size, seed=20) if bias else None
    norms = (_random(HIDDEN, seed=21).abs() + 0.5, _random(HIDDEN, seed=22).abs() + 0.5)
    lens = torch.tensor([5, 13, 4, 9, 2][:requests])
    per_request = [-(-int(n) // BLOCK) for n in lens]
    blocks = sum(per_request) + 2
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(23))
    tables = torch.zeros(requests, max(per_request), dtype=torch.int64)
    used = 0
    for r, count in enumerate(per_request):
        tables[r, :count], used = order[used : used + count], used + count
    slots = torch.stack(
        [tables[r, (n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for r, n in enumerate(lens.tolist())]
    )
    kv_cache = _random(2, blocks, BLOCK, KV_HEADS, DIM, seed=24).to(cache_dtype)
    rope = RopeTables(_random(requests, 1, DIM, seed=25), _random(requests, 1, DIM, seed=26))
    x = _random(requests, HIDDEN, seed=27, scale=2)
    residual = None if first_layer else _random(requests, HIDDEN, seed=28, scale=3)

    kv_expected = kv_cache.clone()
    expected, expected_stream = _composed(
        weights,
        qkv_bias,
        norms,
        x.clone(),
        None if residual is None else residual.clone(),
        rope,
        kv_expected,
        slots,
        lens,
        tables,
    )

    bias_pointer = None if qkv_bias is None else qkv_bias.data_ptr()
    layer = cpu_layer.Layer(
        *map(_struct, weights),
        bias_pointer,
        norms[0].data_ptr(),
        norms[1].data_ptr(),
        1e-5,
        DIM**-0.5,
        HIDDEN,
        HEADS,
        KV_HEADS,
        DIM,
    )
    rows = torch.arange(requests)
    step = cpu_layer.DecodeStep(
        requests,
        rope.cos.data_ptr(),
        rope.sin.data_ptr(),
        slots.data_ptr(),
        rows.data_ptr(),
        lens.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        blocks,
        BLOCK,
        cpu_ops.half_cache(kv_cache),
    )
    out, stream = cpu_layer.decode_layer(layer, step, kv_cache, x, residual)
    assert torch.equal(out, expected) and torch.equal(stream, expected_stream)
    assert torch.equal(kv_cache, kv_expected)  # the new K/V went to the same slots
    assert stream is (x if first_layer else residual)  # summed in place

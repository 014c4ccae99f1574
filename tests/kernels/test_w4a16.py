"""The W4A16 GEMM against its pure-torch reference and against the weight's definition
(`GroupQuantized.dequantize`): decode and prefill row counts, ragged N, group sizes 32,
64 and 128, one split and several (uneven) splits of K. Small grids: the interpreter
runs each program instance in Python."""

from __future__ import annotations

import pytest
import torch

from kubellm.kernels.reference import w4a16_reference
from kubellm.kernels.w4a16 import split_k, w4a16
from kubellm.runtime.model.quantized import GroupQuantized
from tests.helpers import TRITON_DEVICE

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if TRITON_DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _weight(rows: int, cols: int, group: int, seed: int) -> GroupQuantized:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
    scales = torch.rand(rows, cols // group, generator=generator) * 0.02 + 0.001
    offsets = -8 * scales + torch.randn(rows, cols // group, generator=generator) * 0.005
    return GroupQuantized(codes, scales, offsets, 4, group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "cols", "inputs", "group", "splits"),
    [
        (1, 64, 128, 32, 1),
        (1, 96, 256, 64, 3),
        (5, 80, 256, 128, 2),
        (33, 64, 128, 32, 1),
        (3, 64, 192, 64, 1),
    ],
)
def test_w4a16_matches_the_reference_and_the_definition(dtype, rows, cols, inputs, group, splits):
    weight = _weight(cols, inputs, group, seed=rows + inputs)
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(dtype)
    on = [t.to(TRITON_DEVICE) for t in (x, weight.codes, weight.scales, weight.offsets)]
    got = w4a16(*on, group, splits=splits).cpu()
    reference = w4a16_reference(x, weight.codes, weight.scales, weight.offsets, group)
    definition = (x.double() @ weight.dequantize().double().T).float()
    scale = definition.abs().max().item()
    assert got.dtype == dtype and got.shape == (rows, cols)
    assert torch.allclose(got.float(), reference.float(), atol=TOLERANCE[dtype] * scale, rtol=0)
    assert torch.allclose(got.float(), definition, atol=TOLERANCE[dtype] * scale, rtol=0)


def test_split_k_fills_the_gpu_only_for_decode_sized_batches():
    assert split_k(1, 4096, 4096, 64, sms=132) == 4  # 64 output tiles: 4 splits -> 256
    assert split_k(2048, 4096, 4096, 64, sms=132) == 1  # plenty of tiles already
    assert split_k(1, 64, 128, 64, sms=132) == 2  # never more splits than K slices


def test_every_layer_of_llama_3_1_8b_and_70b_per_rank_splits_into_slices():
    """The K of each layer (hidden, MLP; 70B's row-parallel shards at TP 4 and 8) is a
    multiple of every BLOCK_K the kernel uses, so it serves those checkpoints."""
    from kubellm.kernels.w4a16 import w4a16_constants
    from tests.kernels.compile_for_gpu import W4A16_GROUPS

    inputs = {4096, 14336, 8192, 28672 // 4, 28672 // 8, 8192 // 4, 8192 // 8}
    for group in W4A16_GROUPS:
        block_k = w4a16_constants(1, group, True)["BLOCK_K"]
        assert all(k % block_k == 0 and k % group == 0 for k in inputs), group

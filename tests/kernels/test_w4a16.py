"""The W4A16 GEMM against its pure-torch reference and against the weight's definition
(`GroupQuantized.dequantize`): decode and prefill row counts, ragged N, group sizes 32,
64 and 128, K whole and split into its segments (a short last one); and a row's bits
whatever M and the split. Small grids: the interpreter runs each program instance in
Python."""

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
    ("rows", "cols", "inputs", "group", "split"),
    [
        (1, 64, 128, 32, False),
        (1, 96, 1280, 64, True),
        (5, 80, 1152, 128, True),
        (33, 64, 128, 32, False),
        (3, 64, 192, 64, False),
    ],
)
def test_w4a16_matches_the_reference_and_the_definition(dtype, rows, cols, inputs, group, split):
    weight = _weight(cols, inputs, group, seed=rows + inputs)
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(dtype)
    on = [t.to(TRITON_DEVICE) for t in (x, weight.codes, weight.scales, weight.offsets)]
    got = w4a16(*on, group, split=split).cpu()
    reference = w4a16_reference(x, weight.codes, weight.scales, weight.offsets, group)
    definition = (x.double() @ weight.dequantize().double().T).float()
    scale = definition.abs().max().item()
    assert got.dtype == dtype and got.shape == (rows, cols)
    assert torch.allclose(got.float(), reference.float(), atol=TOLERANCE[dtype] * scale, rtol=0)
    assert torch.allclose(got.float(), definition, atol=TOLERANCE[dtype] * scale, rtol=0)


def test_split_k_only_for_decode_sized_batches_that_leave_the_gpu_idle():
    assert split_k(1, 4096, 4096, sms=132)  # 64 output tiles for 132 SMs
    assert not split_k(2048, 4096, 4096, sms=132)  # plenty of tiles already
    assert not split_k(1, 64, 512, sms=132)  # one segment of K: nothing to split
    assert not split_k(1, 32768, 4096, sms=132)  # 512 tiles


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_whatever_m_and_the_split(dtype):
    """A row's output, bit for bit, as a decode (one row, K split into its segments, as
    `split_k` chooses there), as one of 70 rows over two row tiles with K whole, and at
    another place among 5: what keeps a token's tokens independent of its batch."""
    weight = _weight(96, 1280, 64, seed=9)  # three segments of K, the last short
    x = torch.randn(70, 1280, generator=torch.Generator().manual_seed(4)).to(dtype)
    on = [t.to(TRITON_DEVICE) for t in (x, weight.codes, weight.scales, weight.offsets)]
    whole = w4a16(*on, 64, split=False)
    for row in (0, 3, 66):
        alone = on[0][row : row + 1]
        assert torch.equal(w4a16(alone, *on[1:], 64, split=True), whole[row : row + 1])
        assert torch.equal(w4a16(alone, *on[1:], 64, split=False), whole[row : row + 1])
    assert torch.equal(w4a16(on[0][1:6], *on[1:], 64, split=True), whole[1:6])


def test_every_layer_of_llama_3_1_8b_and_70b_per_rank_splits_into_slices():
    """The K of each layer (hidden, MLP; 70B's row-parallel shards at TP 4 and 8) is a
    multiple of every BLOCK_K the kernel uses, so it serves those checkpoints."""
    from kubellm.kernels.w4a16 import w4a16_constants
    from tests.kernels.compile_for_gpu import W4A16_GROUPS

    inputs = {4096, 14336, 8192, 28672 // 4, 28672 // 8, 8192 // 4, 8192 // 8}
    for group in W4A16_GROUPS:
        block_k = w4a16_constants(group, True, False)["BLOCK_K"]
        assert all(k % block_k == 0 and k % group == 0 for k in inputs), group

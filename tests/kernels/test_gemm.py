"""The Triton GEMMs against their pure-torch reference and against the weight's
definition (`GroupQuantized.dequantize`, or the dense weight itself): decode and prefill
row counts, ragged N and (dense) K, 4-bit group sizes 32, 64 and 128 and GGUF's 8-bit
groups of 32, K whole and split into its segments (a short last one); and a row's bits
whatever M and the split, for every weight form. Small grids: the interpreter runs each
program instance in Python."""

from __future__ import annotations

import pytest
import torch

from kubellm.kernels.gemm import dense_gemm, gemm_constants, quantized_gemm, split_k
from kubellm.kernels.reference import quantized_gemm_reference
from kubellm.runtime.model.quantized import GroupQuantized
from tests.helpers import TRITON_DEVICE

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if TRITON_DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _weight(rows: int, cols: int, group: int, seed: int, bits: int = 4) -> GroupQuantized:
    generator = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
    else:
        codes = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=generator)
    scales = torch.rand(rows, cols // group, generator=generator) * 0.02 + 0.001
    center = 8 if bits == 4 else 0
    offsets = -center * scales + torch.randn(rows, cols // group, generator=generator) * 0.005
    return GroupQuantized(codes, scales, offsets, bits, group)


def _dense(rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def _on(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(TRITON_DEVICE) for t in tensors]


def _assert_close(got, expected, dtype):
    scale = expected.abs().max().item()
    assert torch.allclose(got.float(), expected.float(), atol=TOLERANCE[dtype] * scale, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "cols", "inputs", "bits", "group", "split"),
    [
        (1, 64, 128, 4, 32, False),
        (1, 96, 1280, 4, 64, True),
        (5, 80, 1152, 4, 128, True),
        (33, 64, 128, 4, 32, False),
        (3, 64, 192, 4, 64, False),
        (2, 72, 1088, 8, 32, True),
        (7, 40, 96, 8, 32, False),
    ],
)
def test_quantized_gemm_matches_the_reference_and_the_definition(
    dtype, rows, cols, inputs, bits, group, split
):
    weight = _weight(cols, inputs, group, seed=rows + inputs, bits=bits)
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(dtype)
    on = _on(x, weight.codes, weight.scales, weight.offsets)
    got = quantized_gemm(*on, bits, group, split=split).cpu()
    reference = quantized_gemm_reference(
        x, weight.codes, weight.scales, weight.offsets, bits, group
    )
    definition = (x.double() @ weight.dequantize().double().T).float()
    assert got.dtype == dtype and got.shape == (rows, cols)
    _assert_close(got, reference, dtype)
    _assert_close(got, definition, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "cols", "inputs", "split"),
    [(1, 96, 96, False), (1, 70, 1100, True), (9, 160, 96, False), (65, 64, 160, False)],
)
def test_dense_gemm_matches_the_product_with_its_bias(dtype, rows, cols, inputs, split):
    """K that is no multiple of the 64-input slice (the tiny models' 96 and 160), M over
    one tile, K split with a ragged last segment."""
    weight, bias = _dense(cols, inputs, seed=inputs, dtype=dtype), _dense(1, cols, 3, dtype)[0]
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = dense_gemm(*_on(x, weight, bias), split=split).cpu()
    assert got.dtype == dtype and got.shape == (rows, cols)
    _assert_close(got, (x.double() @ weight.double().T + bias.double()).float(), dtype)


def test_split_k_only_for_decode_sized_batches_that_leave_the_gpu_idle():
    assert split_k(1, 4096, 4096, sms=132)  # 64 output tiles for 132 SMs
    assert not split_k(2048, 4096, 4096, sms=132)  # plenty of tiles already
    assert not split_k(1, 64, 512, sms=132)  # one segment of K: nothing to split
    assert not split_k(1, 32768, 4096, sms=132)  # 512 tiles


def _products():
    """(name, product(x, split)) of every weight form: three segments of K, the last short."""
    q4, q8 = _weight(96, 1280, 64, seed=9), _weight(96, 1280, 32, seed=10, bits=8)
    dense = _dense(96, 1250, seed=11, dtype=torch.float32)  # and a ragged last slice

    def quantized(weight):
        on = _on(weight.codes, weight.scales, weight.offsets)
        return lambda x, split: quantized_gemm(x, *on, weight.bits, weight.group_size, split=split)

    return {
        "int4": (quantized(q4), 1280),
        "int8": (quantized(q8), 1280),
        "dense": (lambda x, split: dense_gemm(x, _on(dense.to(x.dtype))[0], split=split), 1250),
    }


@pytest.mark.parametrize("form", ["int4", "int8", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_whatever_m_and_the_split(form, dtype):
    """A row's output, bit for bit, as a decode (one row, K split into its segments, as
    `split_k` chooses there), as one of 70 rows over two row tiles with K whole, and at
    another place among 5: what keeps a token's tokens independent of its batch."""
    product, inputs = _products()[form]
    x = _on(torch.randn(70, inputs, generator=torch.Generator().manual_seed(4)).to(dtype))[0]
    whole = product(x, False)
    for row in (0, 3, 66):
        alone = x[row : row + 1]
        assert torch.equal(product(alone, True), whole[row : row + 1])
        assert torch.equal(product(alone, False), whole[row : row + 1])
    assert torch.equal(product(x[1:6], True), whole[1:6])


def test_every_layer_of_llama_3_1_8b_and_70b_per_rank_splits_into_slices():
    """The K of each layer (hidden, MLP; 70B's row-parallel shards at TP 4 and 8) is a
    multiple of every BLOCK_K the kernel uses, so it serves those checkpoints."""
    from tests.kernels.compile_for_gpu import QUANTIZED_GROUPS

    inputs = {4096, 14336, 8192, 28672 // 4, 28672 // 8, 8192 // 4, 8192 // 8}
    for form, group in QUANTIZED_GROUPS:
        block_k = gemm_constants(form, group, True, False)["BLOCK_K"]
        assert all(k % block_k == 0 and k % group == 0 for k in inputs), group


def test_a_quantized_k_that_does_not_split_into_slices_is_refused():
    weight = _weight(64, 96, 32, seed=1)  # group 32: slices of 32
    x = torch.randn(2, 96)
    on = _on(x, weight.codes, weight.scales, weight.offsets)
    with pytest.raises(ValueError, match="slices of 64"):
        quantized_gemm(*on, 4, 96)  # group 96: slices of 64, which split neither

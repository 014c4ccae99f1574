"""kubellm's CPU kernel for quantized weights against its pure-torch reference (the same
rounding of x to int8 per 32 inputs, in fp32) and against the weight's definition
(`GroupQuantized.dequantize` times the exact x): 4-bit and 8-bit codes, groups of 32, 64,
128 and one group per row, an unpaired last block (K / 32 odd), 1-9 rows (the kernel
takes rows four at a time), ragged N (a part of a tile of eight weight rows), rows with
fewer than eight groups, a multiple of eight, and eight and then a few (the offsets are
read eight at a time)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from kubellm.kernels import cpu_library, cpu_qgemm
from kubellm.kernels.reference import cpu_qgemm_reference
from tests.helpers import random_group_quantized

pytestmark = pytest.mark.skipif(
    cpu_library.unavailable() is not None, reason="needs AVX2, FMA, F16C and a C compiler"
)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("rows", "cols", "inputs", "group"),
    [
        (1, 64, 128, 32),
        (2, 37, 96, 32),
        (5, 80, 256, 64),
        (9, 48, 384, 128),
        (4, 16, 160, 160),
        (3, 40, 160, 32),
        (6, 24, 576, 32),
        (2, 13, 1056, 32),
        (7, 8, 512, 64),
    ],
)
def test_cpu_qgemm_matches_the_reference_and_the_definition(bits, rows, cols, inputs, group):
    weight = random_group_quantized(cols, inputs, bits, group, seed=rows + inputs)
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(rows)) * 3
    halves = weight.scales.half(), weight.offsets.half()
    got = cpu_qgemm.cpu_qgemm(x, weight.codes, *halves, bits, group)
    reference = cpu_qgemm_reference(x, weight.codes, *halves, bits, group)
    exact = x @ weight.dequantize().T
    assert got.shape == (rows, cols) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4 * exact.abs().max().item())
    error = (got - exact).norm() / exact.norm()
    assert error < 0.02, error  # int8 activations: about 0.5% here


@pytest.mark.parametrize("bits", [4, 8])
def test_no_offsets_gives_zero_offsets_result_bit_for_bit(bits):
    """Offsets None (a weight without them: GGUF's Q8_0) skips their share and changes
    nothing else."""
    weight = random_group_quantized(20, 576, bits, 32, seed=bits)
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(3))
    scales, zeros = weight.scales.half(), torch.zeros_like(weight.offsets).half()
    assert torch.equal(
        cpu_qgemm.cpu_qgemm(x, weight.codes, scales, None, bits, 32),
        cpu_qgemm.cpu_qgemm(x, weight.codes, scales, zeros, bits, 32),
    )


def test_rounding_x_is_per_block_of_32():
    """One huge input in the first block does not flatten the second block's values."""
    weight = random_group_quantized(8, 64, 8, 32, seed=1)
    small = torch.randn(1, 32, generator=torch.Generator().manual_seed(2)) * 1e-3
    x = torch.cat([torch.full((1, 32), 10.0), small], dim=1)
    halves = weight.scales.half(), weight.offsets.half()
    got = cpu_qgemm.cpu_qgemm(x, weight.codes, *halves, 8, 32)
    second = x[:, 32:] @ weight.dequantize()[:, 32:].T
    first = x[:, :32] @ weight.dequantize()[:, :32].T
    # one scale for the whole row (10 / 127) would round the second block to zeros
    assert ((got - first) - second).norm() < 0.05 * second.norm()


def test_the_library_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = cpu_library.build()
    assert built.parent == tmp_path / "kubellm" and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert cpu_library.build() == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no partial file left


def _qgemm_with(library: ctypes.CDLL, x: torch.Tensor, weight, bits: int) -> torch.Tensor:
    """kubellm_qgemm of one build of the library, called as cpu_qgemm calls it."""
    scales, offsets = weight.scales.half(), weight.offsets.half()
    out = torch.empty(x.shape[0], weight.codes.shape[0])
    i64, pointer = ctypes.c_int64, lambda t: ctypes.c_void_p(t.data_ptr())
    status = library.kubellm_qgemm(
        pointer(x),
        i64(x.shape[0]),
        i64(x.shape[1]),
        pointer(weight.codes),
        ctypes.c_int(bits),
        pointer(scales),
        pointer(offsets),
        i64(out.shape[1]),
        i64(weight.group_size),
        pointer(out),
        ctypes.c_int(2),
    )
    assert status == 0
    return out


LEVELS_HERE = cpu_library.levels()[:-1]  # the CPU's levels above the AVX2 base


@pytest.mark.skipif(not LEVELS_HERE, reason="the CPU has no VNNI")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("level", LEVELS_HERE)
def test_each_vnni_build_sums_what_the_avx2_build_sums(level, bits, tmp_path, monkeypatch):
    """A VNNI build (one instruction per block's dot product) sums the same integers as
    the AVX2 build (maddubs and pair sums): the same bits, but for the AVX-512 build,
    whose four-block passes add the partial sums in another order; including blocks of
    extreme codes and inputs, quads, pairs and single blocks, and 1-9 rows."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = [ctypes.CDLL(str(cpu_library.build(name))) for name in (level, "avx2")]
    for rows, cols, inputs, group in [
        (1, 64, 576, 32),
        (9, 24, 1056, 32),
        (4, 16, 160, 160),
        (3, 16, 512, 64),
        (2, 8, 384, 128),
    ]:
        weight = random_group_quantized(cols, inputs, bits, group, seed=rows)
        if bits == 8:  # the extremes: |w| = 128 is the largest unsigned operand
            weight.codes.view(torch.int8)[0, :32] = -128
        weight.codes[1, :16] = 255 if bits == 4 else 127
        x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(bits)) * 3
        x[0, :64] = torch.tensor([100.0, -100.0] * 32)  # inputs rounded to +-127
        got, avx2 = (_qgemm_with(build, x, weight, bits) for build in builds)
        if level == "avx512-vnni":
            torch.testing.assert_close(got, avx2, rtol=1e-5, atol=1e-5 * avx2.abs().max().item())
        else:
            assert torch.equal(got, avx2), (rows, inputs, group)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("rows", "inputs", "group"), [(3, 64, 32), (16, 256, 64), (5, 384, 128)])
def test_dequantize_equals_the_definition_bit_for_bit(bits, rows, inputs, group):
    """The weight of the dense product for large M: GroupQuantized's values exactly."""
    weight = random_group_quantized(rows, inputs, bits, group, seed=inputs + bits)
    halves = weight.scales.half(), weight.offsets.half()
    assert torch.equal(
        cpu_qgemm.dequantize(weight.codes, *halves, bits, group), weight.dequantize()
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_into_bf16_rounds_as_torch_does(bits):
    """The bf16 weight (the dense product over 128 rows under bf16 activations) is the
    fp32 one rounded as `.to(torch.bfloat16)` rounds it, ties to even included: half the
    groups have scale 2^-8 and offset 1, so odd codes land halfway between two bf16
    numbers."""
    weight = random_group_quantized(8, 256, bits, 32, seed=bits)
    weight.scales[:, ::2], weight.offsets[:, ::2] = 2.0**-8, 1.0
    fp32 = weight.dequantize()
    halves = weight.scales.half(), weight.offsets.half()
    got = cpu_qgemm.dequantize(weight.codes, *halves, bits, 32, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, fp32.bfloat16())
    bits32 = fp32.view(torch.int32)
    for wrong in (bits32 >> 16, (bits32 + 0x8000) >> 16):  # truncated; ties rounded up
        assert not torch.equal(got, wrong.to(torch.int16).view(torch.bfloat16))

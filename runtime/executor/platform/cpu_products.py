"""Quantized layers' products on CPU, at decode-sized M, by a kernel that reads the weight
packed: kubellm's own (`QgemmProduct`, kubellm/kernels/cpu_qgemm.c: AVX2 integer dot
products, each input row rounded to int8 per 32 inputs, as llama.cpp does) where the CPU
has AVX2 and the machine a C compiler, else torch's int4 weight-only kernel
(`Int4PackProduct`, `_weight_int4pack_mm_for_cpu`, its inputs rounded to bf16: with fp32
inputs it is 10-30x slower). Both give a row the same bits whatever else is in the
product, so every product goes through them (a dense product's rows depend on how many
there are), except above `QGEMM_MAX_ROWS` where kubellm's kernel's dense product would be
bf16 (a dtype asked for by name): the weight is then rebuilt from the same storage for
one dense product. BENCHMARKS.md ("Quantized GEMMs on CPU") has the measurements.
"""

from __future__ import annotations

import torch

from kubellm.kernels import cpu_qgemm
from kubellm.runtime.model.dense import linear
from kubellm.runtime.model.quantized import GroupQuantized, QuantizedLayout, QuantizedWeight

# With bf16 dense products (CPUs with fast bf16), at most this many rows per product go
# through kubellm's CPU kernel; with fp32 ones every product does: as fast as the rebuilt
# fp32 product up to ~512 rows, ~20% slower at 2,048, and a row's result is then the
# same whatever shares its step (BENCHMARKS.md, "Quantized GEMMs on CPU").
QGEMM_MAX_ROWS = 128


KERNELS = {
    "qgemm": "kubellm's CPU kernel (int8 dot products, activations rounded to int8 per 32 inputs)",
    "int4pack": "torch's int4 kernel (activations rounded to bf16; kubellm's CPU kernel "
    "cannot be used here)",
}


def cpu_product(
    weight: QuantizedWeight, kernel: str, dense_dtype: torch.dtype
) -> QgemmProduct | Int4PackProduct | None:
    """`kernel`'s storage for a loaded weight ("qgemm" or "int4pack"); None where the
    kernel cannot take it (the layer then multiplies exactly). `dense_dtype`: of the
    products too large for kubellm's kernel (fp32 where the CPU has no fast bf16)."""
    layout = weight.layout
    if kernel == "qgemm" and layout.group_size % cpu_qgemm.BLOCK == 0:
        return QgemmProduct(weight.stored(), dense_dtype)
    if layout.bits == 4:
        return Int4PackProduct.of(weight.stored(), weight.shape)
    return None


class QgemmProduct:
    """kubellm's CPU kernel over the checkpoint's codes (kept once, as loaded) and fp16
    scales and offsets (offsets None where all are zero, as in GGUF's Q8_0, which the
    kernel then skips)."""

    def __init__(self, weight: GroupQuantized, dense_dtype: torch.dtype) -> None:
        self.layout = QuantizedLayout(weight.bits, weight.group_size)
        self.codes, self.scales, self.offsets = (
            weight.codes,
            weight.scales.half(),
            weight.offsets.half(),
        )
        self.has_offsets = bool(self.offsets.any())
        self.dense_dtype = dense_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bits, group = self.layout.bits, self.layout.group_size
        if self.dense_dtype == torch.float32 or x.shape[0] <= QGEMM_MAX_ROWS:
            return cpu_qgemm.cpu_qgemm(x, *self.operands(), bits, group).to(x.dtype)
        dtype = self.dense_dtype
        return linear(x.to(dtype), self.dense(dtype)).to(x.dtype)

    def operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes, fp16 scales and offsets as `cpu_qgemm` reads them."""
        return self.codes, self.scales, self.offsets if self.has_offsets else None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, inputs in stored order: `GroupQuantized.dequantize`'s
        values from this storage, bit for bit (in C, straight into bf16 too, 3-15x
        faster than torch)."""
        bits, group = self.layout.bits, self.layout.group_size
        made = dtype if dtype == torch.bfloat16 else torch.float32
        weight = cpu_qgemm.dequantize(self.codes, self.scales, self.offsets, bits, group, made)
        return weight.to(dtype)

    def stored(self, rows: torch.Tensor | None = None) -> GroupQuantized:
        tensors = (self.codes, self.scales, self.offsets)
        if rows is not None:
            tensors = tuple(t.index_select(0, rows) for t in tensors)
        codes, scales, offsets = tensors
        bits, group = self.layout.bits, self.layout.group_size
        return GroupQuantized(codes, scales.float(), offsets.float(), bits, group)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales, self.offsets]


class Int4PackProduct:
    """torch's CPU int4 kernel over its own layout (its form is `(q - 8) * s + z`, so
    `z = o + 8 s`, in bf16), for products of any number of rows: a row's result does not
    depend on the others (a dense product's would), at ~1.6x the time of the rebuilt
    weight's dense fp32 product from 256 rows (BENCHMARKS.md)."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        block: int,
        group_size: int,
    ) -> None:
        self.packed, self.scales_and_zeros, self.block = packed, scales_and_zeros, block
        self.group_size = group_size

    @classmethod
    def of(cls, weight: GroupQuantized, shape: tuple[int, int]) -> Int4PackProduct | None:
        """None where the kernel's own limits, or a layout we cannot read back, refuse
        the weight."""
        if shape[0] % 16 or weight.group_size not in (32, 64, 128, 256):
            return None
        codes = weight.unpacked_codes()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        block = next(
            (
                b
                for b in (64, 32, 16)
                if shape[0] % b == 0 and torch.equal(_int4pack_codes(packed, b), codes)
            ),
            None,
        )
        if block is None:
            return None
        zeros = weight.offsets + 8 * weight.scales
        scales_and_zeros = torch.stack((weight.scales, zeros), dim=-1).transpose(0, 1)
        scales_and_zeros = scales_and_zeros.contiguous().to(torch.bfloat16)
        return cls(packed, scales_and_zeros, block, weight.group_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        ).to(x.dtype)

    def stored(self, rows: torch.Tensor | None = None) -> GroupQuantized:
        codes = _int4pack_codes(self.packed, self.block)
        low, high = codes[:, 0::2], codes[:, 1::2]
        scales, zeros = self.scales_and_zeros.float().permute(2, 1, 0)  # each [N, G]
        weight = GroupQuantized(low | (high << 4), scales, zeros - 8 * scales, 4, self.group_size)
        return weight if rows is None else weight.rows(rows)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]


def _int4pack_codes(packed: torch.Tensor, block: int) -> torch.Tensor:
    """uint8 [N, K] codes of torch's CPU int4 layout: blocks of `block` rows, each
    [K][block / 2] bytes whose low nibble is row j and high nibble row j + block / 2
    (as the x86 kernels pack it; `Int4PackProduct.of` checks it against the codes)."""
    rows, half = packed.shape
    cols = half * 2
    nibbles = packed.view(rows // block, cols, block // 2)
    codes = torch.cat((nibbles & 15, nibbles >> 4), dim=2)  # [blocks, K, block]
    return codes.permute(0, 2, 1).reshape(rows, cols)

"""Group-quantized weights: the one internal form every 4-bit (and GGUF 8-bit) checkpoint
format is converted into at load, and the layer storage that multiplies by it.

A weight [N out, K in] is integer codes q (4-bit: two per byte along K, the even k in the
low nibble; 8-bit: one per byte), and per row and group of `group_size` inputs a scale s
and an offset o: `W[n, k] = q[n, k] * s[n, g] + o[n, g]` with `g = k // group_size`
(GPTQ and AWQ's `(q - z) * s` is `o = -z * s`; GGUF's `d * q + m` is `o = m`). A
GPTQ act-order weight keeps its inputs sorted by group: `perm` says which input each
stored column is, and the layer reads `x[:, perm]`.

On CPU the product at decode-sized M goes through a quantized kernel (`cpu_kernel`):
kubellm's own (kubellm/kernels/cpu_qgemm.c: AVX2 integer dot products, each input row
rounded to int8 per 32 inputs, as llama.cpp does) where the CPU has AVX2 and the machine
a C compiler, else torch's int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`, its
inputs rounded to bf16: with fp32 inputs it is 10-30x slower); above `INT4PACK_MAX_ROWS`
rows, and above `QGEMM_MAX_ROWS` where the dense product would be bf16, the weight is
rebuilt for one dense product. Without a kernel
(asked-for fp32: the exact path the oracles test) each product dequantizes the weight
exactly. On GPUs every 4-bit product is the Triton W4A16
GEMM (kubellm/kernels/w4a16.py: dequantized in the tile, fp32 accumulation, split-K).
BENCHMARKS.md ("Quantized GEMMs on CPU") has the measurements behind the crossover.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kubellm.kernels import cpu_library, cpu_qgemm
from kubellm.runtime.model.dense import linear

logger = logging.getLogger(__name__)

# With bf16 dense products (CPUs with fast bf16), at most this many rows per product go
# through kubellm's CPU kernel; with fp32 ones every product does: as fast as the rebuilt
# fp32 product up to ~512 rows, ~20% slower at 2,048, and a row's result is then the
# same whatever shares its step (BENCHMARKS.md, "Quantized GEMMs on CPU").
QGEMM_MAX_ROWS = 128
INT4PACK_MAX_ROWS = 64  # at most this many rows per product through torch's int4 kernel


@functools.cache
def cpu_kernel() -> str:
    """The CPU kernel for quantized layers' decode-sized products: "qgemm" (kubellm's,
    where kubellm's CPU library can be used: `cpu_library.unavailable`), else
    "int4pack" (torch's). Decided once per process, and logged."""
    reason = cpu_library.unavailable()
    if reason is None:
        logger.info(
            "quantized layers: kubellm's CPU kernel (int8 dot products, activations "
            "rounded to int8 per 32 inputs; built for %s)",
            cpu_library.level(),
        )
        return "qgemm"
    logger.warning("quantized layers: torch's int4 kernel, not kubellm's CPU kernel: %s", reason)
    return "int4pack"


@dataclass
class GroupQuantized:
    """A group-quantized matrix (or this rank's slice of one), on the host."""

    codes: torch.Tensor  # uint8 [N, K/2] (4-bit) or [N, K] (8-bit)
    scales: torch.Tensor  # float32 [N, K/group_size]
    offsets: torch.Tensor  # float32 [N, K/group_size]
    bits: int
    group_size: int
    perm: torch.Tensor | None = None  # int64 [K]: the input each stored column is

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 8 // self.bits

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 [N, K], one code per element."""
        if self.bits == 8:
            return self.codes
        low, high = self.codes & 15, self.codes >> 4
        return torch.stack((low, high), dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [N, K] weight in the checkpoint's input order."""
        rows, cols = self.shape
        groups = self.unpacked_codes().view(rows, cols // self.group_size, self.group_size)
        dense = (groups.float() * self.scales[..., None] + self.offsets[..., None]).view(rows, cols)
        if self.perm is not None:
            dense = torch.empty_like(dense).index_copy_(1, self.perm, dense)
        return dense.to(dtype)

    def rows(self, index: torch.Tensor | slice) -> GroupQuantized:
        """The weight of some output rows (a shard, or rows reordered)."""
        return GroupQuantized(
            self.codes[index],
            self.scales[index],
            self.offsets[index],
            self.bits,
            self.group_size,
            self.perm,
        )

    def columns(self, start: int, length: int) -> GroupQuantized:
        """The weight of inputs [start, start + length) (a row-parallel shard): whole
        groups only, and never of an act-order weight (its groups are spread over K)."""
        if (start, length) == (0, self.shape[1]):
            return self
        if self.perm is not None:
            raise ValueError(
                "an act-order (desc_act) weight cannot be split along its "
                "inputs: use tensor_parallel_size 1 for this checkpoint"
            )
        if start % self.group_size or length % self.group_size:
            raise ValueError(
                f"quantization groups of {self.group_size} inputs do not fall on the "
                f"shard boundaries [{start}, {start + length}): choose a "
                f"tensor_parallel_size that splits the inputs into whole groups"
            )
        per_byte = 8 // self.bits
        groups = slice(start // self.group_size, (start + length) // self.group_size)
        codes = self.codes[:, start // per_byte : (start + length) // per_byte]
        return GroupQuantized(
            codes, self.scales[:, groups], self.offsets[:, groups], self.bits, self.group_size
        )


@dataclass(frozen=True)
class QuantizedLayout:
    """How one layer's weight is stored: what the model builder allocates."""

    bits: int
    group_size: int


# our module name ("layers.0.self_attn.qkv_proj") -> its layout, None for a dense weight
WeightLayouts = Callable[[str], "QuantizedLayout | None"]


def all_dense(module: str) -> None:
    """The layouts of a model without quantized weights."""
    return None


class QuantizedWeight(nn.Module):
    """A layer's group-quantized weight [out_features, in_features] and its products.
    Parts are put in row ranges (fused projections); `prepare()` runs once loaded."""

    def __init__(self, out_features: int, in_features: int, layout: QuantizedLayout) -> None:
        super().__init__()
        if in_features % layout.group_size:
            raise ValueError(
                f"quantization group size {layout.group_size} does not divide "
                f"the layer's {in_features} inputs"
            )
        self.layout = layout
        self.shape = (out_features, in_features)
        groups = in_features // layout.group_size
        packed = in_features * layout.bits // 8
        code_dtype = torch.uint8 if layout.bits == 4 else torch.int8
        self.register_buffer("codes", torch.zeros(out_features, packed, dtype=code_dtype))
        self.register_buffer("scales", torch.zeros(out_features, groups))
        self.register_buffer("offsets", torch.zeros(out_features, groups))
        self.perm: torch.Tensor | None = None
        self.int4pack: tuple[torch.Tensor, torch.Tensor, int] | None = None  # and its block
        self.half_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # fp16, for qgemm
        self.has_offsets = True  # False: every offset is zero, which qgemm then skips
        self.dense_dtype: torch.dtype | None = None  # of the dense product; None: x's

    def _apply(self, fn, recurse: bool = True):
        """Scales and offsets stay fp32 when the model is cast to its dtype (which the
        builder does before anything is loaded)."""
        super()._apply(fn, recurse)
        self.scales, self.offsets = self.scales.float(), self.offsets.float()
        return self

    def put(self, row: int, value: GroupQuantized) -> None:
        """Copy `value` into rows [row, row + its rows)."""
        if (value.bits, value.group_size) != (self.layout.bits, self.layout.group_size):
            raise ValueError(
                f"a {value.bits}-bit tensor in groups of {value.group_size} cannot join a "
                f"layer of {self.layout.bits}-bit groups of {self.layout.group_size}"
            )
        if value.shape[1] != self.shape[1]:
            raise ValueError(f"has {value.shape[1]} inputs, expected {self.shape[1]}")
        rows = slice(row, row + value.shape[0])
        with torch.no_grad():
            self.codes[rows] = value.codes
            self.scales[rows] = value.scales.float()
            self.offsets[rows] = value.offsets.float()
        if value.perm is not None:
            if self.perm is not None and not torch.equal(self.perm, value.perm):
                raise ValueError(
                    "the parts of one fused layer have different act-order "
                    "permutations; this checkpoint cannot be fused"
                )
            self.perm = value.perm

    def stored(self, rows: torch.Tensor | None = None) -> GroupQuantized:
        """The weight as stored, or some of its rows: its inputs in stored order (`perm`
        not applied), fp32 scales also where qgemm's storage holds them in fp16."""
        codes = self.codes
        scales, offsets = self.half_scales or (self.scales, self.offsets)
        if rows is not None:
            codes, scales, offsets = (t.index_select(0, rows) for t in (codes, scales, offsets))
        return GroupQuantized(
            codes, scales.float(), offsets.float(), self.layout.bits, self.layout.group_size
        )

    def prepare(self, kernel: str | None, dense_dtype: torch.dtype) -> None:
        """Once loaded: the dtype of the dense product (fp32 where the CPU has no fast
        bf16), and on CPU the storage `kernel` ("qgemm", "int4pack"; None: exact) reads."""
        self.dense_dtype = dense_dtype
        if self.codes.device.type != "cpu":
            return
        if kernel == "qgemm" and self.layout.group_size % cpu_qgemm.BLOCK == 0:
            self.half_scales = (self.scales.half(), self.offsets.half())
            self.has_offsets = bool(self.half_scales[1].any())
            self.scales, self.offsets = torch.empty(0), torch.empty(0)
        elif kernel in ("qgemm", "int4pack") and self.layout.bits == 4:
            self._to_int4pack()

    def _to_int4pack(self) -> None:
        """The weight moves into torch's int4 kernel's own layout (its form is
        `(q - 8) * s + z`, so `z = o + 8 s`, in bf16), which then also feeds the dense
        product, so both kernels multiply by the same weight."""
        if self.shape[0] % 16 or self.layout.group_size not in (32, 64, 128, 256):
            return  # the kernel's own limits: such layers take the dense product
        codes = self.stored().unpacked_codes()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        block = next(
            (
                b
                for b in (64, 32, 16)
                if self.shape[0] % b == 0 and torch.equal(_int4pack_codes(packed, b), codes)
            ),
            None,
        )
        if block is None:
            return  # a layout we cannot read back: keep ours, take the dense product
        zeros = self.offsets + 8 * self.scales
        scales_and_zeros = torch.stack((self.scales, zeros), dim=-1).transpose(0, 1)
        self.int4pack = (packed, scales_and_zeros.contiguous().to(torch.bfloat16), block)
        empty = torch.empty(0)
        self.codes, self.scales, self.offsets = empty.to(torch.uint8), empty, empty

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.codes.is_cuda and self.layout.bits == 4:
            from kubellm.kernels.w4a16 import w4a16

            y = w4a16(x, self.codes, self.scales, self.offsets, self.layout.group_size)
            return y if bias is None else y + bias
        if self.half_scales is not None and (
            self.dense_dtype == torch.float32 or x.shape[0] <= QGEMM_MAX_ROWS
        ):
            bits, group = self.layout.bits, self.layout.group_size
            y = cpu_qgemm.cpu_qgemm(x, *self.qgemm_operands(), bits, group).to(x.dtype)
            return y if bias is None else y + bias
        if self.int4pack is not None and x.shape[0] <= INT4PACK_MAX_ROWS:
            packed, scales_and_zeros, _ = self.int4pack
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), packed, self.layout.group_size, scales_and_zeros
            ).to(x.dtype)
            return y if bias is None else y + bias
        dtype = self.dense_dtype or x.dtype
        weight = self._dense_in_stored_order(dtype)
        y = linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))
        return y.to(x.dtype)

    def qgemm_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes, fp16 scales and offsets as cpu_qgemm reads them: offsets None where all
        are zero (GGUF's Q8_0), which the kernel then skips."""
        assert self.half_scales is not None, "prepare('qgemm', ...) first"
        scales, offsets = self.half_scales
        return self.codes, scales, offsets if self.has_offsets else None

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps, in whichever kernel's storage: its bytes."""
        kernel_storage = (self.int4pack or ())[:2] + (self.half_scales or ())
        return [*self.buffers(), *kernel_storage]

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Some rows of the weight in fp32 (an embedding lookup): `dequantize`'s values
        for those rows. Not for an act-order weight (nor needed: embeddings have none)."""
        return self.stored(rows).dequantize()

    def _dense_in_stored_order(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, its inputs in stored order: as `GroupQuantized.dequantize`
        computes it, rounded to `dtype` (the same values, bit for bit; in C from the CPU
        kernel's storage, straight into bf16 too, 3-15x faster than torch), or from torch's
        int4 kernel's layout."""
        if self.half_scales is not None:
            bits, group = self.layout.bits, self.layout.group_size
            made = dtype if dtype == torch.bfloat16 else torch.float32
            return cpu_qgemm.dequantize(self.codes, *self.half_scales, bits, group, made).to(dtype)
        if self.int4pack is None:
            return self.stored().dequantize().to(dtype)
        rows, cols = self.shape
        group = self.layout.group_size
        packed, scales_and_zeros, block = self.int4pack
        groups = _int4pack_codes(packed, block).view(rows, -1, group).float().sub_(8)
        scales, zeros = scales_and_zeros.float().permute(2, 1, 0)  # each [N, G]
        weight = groups.mul_(scales[..., None]).add_(zeros[..., None]).view(rows, cols)
        return weight.to(dtype)


def _int4pack_codes(packed: torch.Tensor, block: int) -> torch.Tensor:
    """uint8 [N, K] codes of torch's CPU int4 layout: blocks of `block` rows, each
    [K][block / 2] bytes whose low nibble is row j and high nibble row j + block / 2
    (as the x86 kernels pack it; `prepare` checks it against the codes it packed)."""
    rows, half = packed.shape
    cols = half * 2
    nibbles = packed.view(rows // block, cols, block // 2)
    codes = torch.cat((nibbles & 15, nibbles >> 4), dim=2)  # [blocks, K, block]
    return codes.permute(0, 2, 1).reshape(rows, cols)


def resident_bytes(model: nn.Module) -> int:
    """The bytes of every tensor a model keeps (parameters, buffers, the quantized layers'
    kernel storage), each storage counted once (tied weights, views)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [
        t for m in model.modules() if isinstance(m, QuantizedWeight) for t in m.held_tensors()
    ]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())

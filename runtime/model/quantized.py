"""Group-quantized weights: the one internal form every 4-bit (and GGUF 8-bit) checkpoint
format is converted into at load, and the layer storage that multiplies by it.

A weight [N out, K in] is integer codes q (4-bit: two per byte along K, the even k in the
low nibble; 8-bit: one per byte), and per row and group of `group_size` inputs a scale s
and an offset o: `W[n, k] = q[n, k] * s[n, g] + o[n, g]` with `g = k // group_size`
(GPTQ and AWQ's `(q - z) * s` is `o = -z * s`; GGUF's `d * q + m` is `o = m`). A
GPTQ act-order weight keeps its inputs sorted by group: `perm` says which input each
stored column is, and the layer reads `x[:, perm]`.

The layer multiplies by the weight exactly (dequantized for each product: the path the
oracles test) unless its platform gives it a `QuantizedProduct`, a kernel that then holds
the weight in its own storage (`executor/platform`: kubellm's x86 kernel, torch's CPU
int4 kernel, the Triton W4A16 GEMM on GPUs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kubellm.runtime.model.dense import linear


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


class QuantizedProduct(Protocol):
    """A platform's kernel for one quantized layer, holding the weight in the storage
    it reads (`QuantizedWeight.use`)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K], inputs in stored order -> x @ W.T [M, N] in x's dtype."""

    def stored(self, rows: torch.Tensor | None = None) -> GroupQuantized:
        """The weight (or some of its rows) as this storage holds it."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the storage keeps: its bytes."""


class QuantizedWeight(nn.Module):
    """A layer's group-quantized weight [out_features, in_features] and its products.
    Parts are put in row ranges (fused projections); then the platform may hand the
    weight to a kernel of its own (`use`)."""

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
        self.product: QuantizedProduct | None = None  # None: exact, dequantized per product

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

    def use(self, product: QuantizedProduct | None) -> None:
        """Once loaded: multiply through `product` (None: exactly), which now holds the
        weight; the layer's own copy goes."""
        if product is None:
            return
        self.product = product
        empty = torch.empty(0, device=self.codes.device)
        self.codes, self.scales, self.offsets = empty.to(self.codes.dtype), empty, empty

    def stored(self, rows: torch.Tensor | None = None) -> GroupQuantized:
        """The weight as stored, or some of its rows: its inputs in stored order (`perm`
        not applied)."""
        if self.product is not None:
            return self.product.stored(rows)
        codes, scales, offsets = self.codes, self.scales, self.offsets
        if rows is not None:
            codes, scales, offsets = (t.index_select(0, rows) for t in (codes, scales, offsets))
        return GroupQuantized(codes, scales, offsets, self.layout.bits, self.layout.group_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.product is not None:
            y = self.product(x)
            return y if bias is None else y + bias
        return linear(x, self.stored().dequantize(x.dtype), bias)

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps, in whichever kernel's storage: its bytes."""
        return [*self.buffers(), *(self.product.tensors() if self.product else ())]

    def dense_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Some rows of the weight in fp32 (an embedding lookup): `dequantize`'s values
        for those rows. Not for an act-order weight (nor needed: embeddings have none)."""
        return self.stored(rows).dequantize()


def resident_bytes(model: nn.Module) -> int:
    """The bytes of every tensor a model keeps (parameters, buffers, the quantized layers'
    kernel storage), each storage counted once (tied weights, views)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [
        t for m in model.modules() if isinstance(m, QuantizedWeight) for t in m.held_tensors()
    ]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())

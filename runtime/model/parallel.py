"""Tensor-parallel layers: each rank holds a shard and loads only that shard.

Column-parallel layers keep some output rows (QKV by heads, gate/up by columns) and need
no communication; row-parallel layers keep the matching input columns and all-reduce
their partial sums (o_proj, down_proj: one all-reduce each). The embedding and the
output head split the vocabulary: ids outside a rank's range embed to zero before the
all-reduce, and the head's logits are gathered to rank 0, which samples. With one rank
every collective is a no-op and these are plain linear layers.

`load(kind, part, tensor)` copies this rank's slice of a checkpoint tensor into `kind`
("weight" or "bias") and returns the rows it filled, so the loader can tell a complete
checkpoint from one with missing tensors. A linear layer built with a `QuantizedLayout`
keeps its weight group-quantized (`QuantizedWeight`); any other layer given a quantized
tensor dequantizes it as it is copied in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kubellm.runtime.executor.distributed import TensorParallel
from kubellm.runtime.model.dense import linear
from kubellm.runtime.model.lazy_tensor import LazyTensor
from kubellm.runtime.model.quantized import GroupQuantized, QuantizedLayout, QuantizedWeight


@dataclass(frozen=True)
class Shard:
    """Rows [start, start + size) of a checkpoint tensor with `total` rows."""

    total: int
    start: int
    size: int

    @classmethod
    def even(cls, total: int, tp: TensorParallel) -> Shard:
        return cls(total, *tp.shard(total))


def _check_rows(tensor: LazyTensor, dim: int, expected: int, what: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{what}: the checkpoint tensor has shape {list(tensor.shape)}, "
            f"expected {expected} along dimension {dim}"
        )


def _copy(
    target: torch.Tensor | QuantizedWeight,
    dim: int,
    offset: int,
    value: torch.Tensor | GroupQuantized,
) -> None:
    """Put `value` at `offset` along `dim` (a quantized weight takes whole rows only)."""
    if isinstance(target, QuantizedWeight):
        if not isinstance(value, GroupQuantized):
            raise ValueError("is dense, but this layer was built for quantized weights")
        target.put(offset if dim == 0 else 0, value)
        return
    if isinstance(value, GroupQuantized):
        value = value.dequantize(torch.float32)
    with torch.no_grad():
        target.narrow(dim, offset, value.shape[dim]).copy_(value)


def _weight(
    rows: int, columns: int, layout: QuantizedLayout | None
) -> nn.Parameter | QuantizedWeight:
    if layout is None:
        return nn.Parameter(torch.empty(rows, columns))
    return QuantizedWeight(rows, columns, layout)


# x [M, K], a dense weight [N, K], its bias or None -> x @ weight.T + bias [M, N]
DenseProduct = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class Projection(nn.Module):
    """A layer that multiplies by its `weight`: a quantized weight through its own
    product, a dense one through `dense_product`."""

    weight: nn.Parameter | QuantizedWeight
    dense_product: DenseProduct = staticmethod(linear)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.weight, QuantizedWeight):
            return self.weight(x, bias)
        return self.dense_product(x, self.weight, bias)


class ColumnParallelLinear(Projection):
    """This rank's output rows of one or several fused projections (one `Shard` each)."""

    def __init__(
        self,
        in_features: int,
        shards: list[Shard],
        bias: bool,
        layout: QuantizedLayout | None = None,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.offsets = [sum(s.size for s in shards[:i]) for i in range(len(shards))]
        rows = sum(s.size for s in shards)
        self.weight = _weight(rows, in_features, layout)
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)

    def load(self, kind: str, part: int, tensor: LazyTensor) -> int:
        shard = self.shards[part]
        _check_rows(tensor, 0, shard.total, f"{kind} part {part}")
        _copy(getattr(self, kind), 0, self.offsets[part], tensor.narrow(0, shard.start, shard.size))
        return shard.size


class RowParallelLinear(Projection):
    """This rank's input columns; the partial products are summed over the ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp: TensorParallel,
        layout: QuantizedLayout | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.shard = Shard.even(in_features, tp)
        self.weight = _weight(out_features, self.shard.size, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.project(x))

    def load(self, kind: str, part: int, tensor: LazyTensor) -> int:
        _check_rows(tensor, 1, self.shard.total, kind)
        _copy(self.weight, 1, 0, tensor.narrow(1, self.shard.start, self.shard.size))
        return self.weight.shape[0]


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the vocabulary; other ids embed to zero, then all ranks sum.
    With a `QuantizedLayout` (a GGUF file's Q8_0 token embedding, on CPU with kubellm's
    kernel) the rows stay quantized: looked up by dequantizing the rows asked for."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tp: TensorParallel,
        layout: QuantizedLayout | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.shard = Shard.even(vocab_size, tp)
        self.weight = _weight(self.shard.size, hidden_size, layout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._embed(input_ids)
        local = input_ids - self.shard.start
        mine = (local >= 0) & (local < self.shard.size)
        x = self._embed(local.masked_fill(~mine, 0))
        return self.tp.all_reduce(x.masked_fill(~mine[:, None], 0))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, QuantizedWeight):
            return self.weight.dense_rows(ids)
        return F.embedding(ids, self.weight)

    def load(self, kind: str, part: int, tensor: LazyTensor) -> int:
        _check_rows(tensor, 0, self.shard.total, kind)
        _copy(self.weight, 0, 0, tensor.narrow(0, self.shard.start, self.shard.size))
        return self.shard.size


class ParallelLMHead(VocabParallelEmbedding, Projection):
    """Logits for this rank's vocabulary rows, gathered to rank 0 (None elsewhere)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.tp.gather_last_dim(self.project(hidden))


class MissingLayer(nn.Module):
    """A module another pipeline stage holds: no weights here, and the loader skips its
    checkpoint tensors."""


class Replicated(nn.Module):
    """Mixin for modules every rank holds whole (norms): `load` copies the tensor."""

    def load(self, kind: str, part: int, tensor: LazyTensor) -> int:
        param = getattr(self, kind)
        _check_rows(tensor, 0, param.shape[0], kind)
        _copy(param, 0, 0, tensor.full())
        return param.shape[0]

"""A checkpoint tensor that is read only as far as a rank needs it.

Under tensor parallelism each rank keeps a slice of most weights; a safetensors file
reads just that slice (`safe_open(...).get_slice`), so no rank holds a whole matrix it
does not own. A tensor already in memory (a GGUF one) is simply sliced; a quantized one
(`GroupQuantized`) is sliced by whole rows, or by whole groups of inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kubellm.runtime.model.quantized import GroupQuantized

# (dim, start, length) -> that slice of the tensor; dim None: the whole tensor
Reader = Callable[[int | None, int, int], torch.Tensor | GroupQuantized]


class LazyTensor:
    def __init__(self, shape: tuple[int, ...], reader: Reader) -> None:
        self.shape = shape
        self._read = reader

    @classmethod
    def of(cls, tensor: torch.Tensor) -> LazyTensor:
        def read(dim: int | None, start: int, length: int) -> torch.Tensor:
            return tensor if dim is None else tensor.narrow(dim, start, length)

        return cls(tuple(tensor.shape), read)

    @classmethod
    def of_quantized(cls, weight: GroupQuantized) -> LazyTensor:
        def read(dim: int | None, start: int, length: int) -> GroupQuantized:
            if dim is None:
                return weight
            if dim == 0:
                return weight.rows(slice(start, start + length))
            return weight.columns(start, length)

        return cls(weight.shape, read)

    @classmethod
    def of_safetensors(cls, tensor_slice) -> LazyTensor:
        """A `safe_open(...).get_slice(name)`: only the requested rows or columns are read."""

        def read(dim: int | None, start: int, length: int) -> torch.Tensor:
            if dim is None:
                return tensor_slice[:]
            index = (slice(None),) * dim + (slice(start, start + length),)
            return tensor_slice[index]

        return cls(tuple(tensor_slice.get_shape()), read)

    def full(self) -> torch.Tensor | GroupQuantized:
        return self._read(None, 0, 0)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor | GroupQuantized:
        return self._read(dim, start, length)

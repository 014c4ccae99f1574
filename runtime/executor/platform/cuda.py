"""The CUDA platform: Triton's paged-attention kernels (or the torch reference, if asked
for), 4-bit layers through the Triton W4A16 GEMM (kubellm/kernels/w4a16.py: dequantized
in the tile, fp32 accumulation, split-K), and decode steps captured as CUDA graphs where
the attention backend allows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kubellm.runtime.executor.platform.base import Platform
from kubellm.runtime.model.attention import AttentionBackend
from kubellm.runtime.model.quantized import GroupQuantized, QuantizedWeight


class W4A16Product:
    """The Triton W4A16 GEMM over the weight as loaded (fp32 scales and offsets)."""

    def __init__(self, weight: GroupQuantized) -> None:
        from kubellm.kernels.w4a16 import w4a16  # Triton: imported only on GPUs

        self.weight, self.kernel = weight, w4a16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self.kernel(x, w.codes, w.scales, w.offsets, w.group_size)

    def stored(self, rows: torch.Tensor | None = None) -> GroupQuantized:
        return self.weight if rows is None else self.weight.rows(rows)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight.codes, self.weight.scales, self.weight.offsets]


@dataclass(frozen=True)
class CudaPlatform(Platform):
    name: ClassVar[str] = "cuda"

    def captures_cuda_graphs(self, attention: AttentionBackend) -> bool:
        return attention.supports_cuda_graphs

    def quantized_product(self, weight: QuantizedWeight) -> W4A16Product | None:
        return W4A16Product(weight.stored()) if weight.layout.bits == 4 else None

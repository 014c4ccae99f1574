"""The CUDA platform: Triton's paged-attention kernels (or the torch reference, if asked
for), every layer's product through the Triton GEMM (kubellm/kernels/gemm.py: dense,
4-bit and 8-bit weights, fp32 accumulation, split-K, a row's bits independent of M,
where cuBLAS picks its kernel by M), and decode steps captured as CUDA graphs where the
attention backend allows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kubellm.runtime.executor.platform.base import Platform
from kubellm.runtime.model.attention import AttentionBackend
from kubellm.runtime.model.parallel import DenseProduct
from kubellm.runtime.model.quantized import GroupQuantized, QuantizedWeight


class TritonQuantizedProduct:
    """The Triton GEMM over the weight as loaded (4-bit or 8-bit codes, fp32 scales and
    offsets)."""

    def __init__(self, weight: GroupQuantized) -> None:
        from kubellm.kernels.gemm import quantized_gemm  # Triton: imported only on GPUs

        self.weight, self.kernel = weight, quantized_gemm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return self.kernel(x, w.codes, w.scales, w.offsets, w.bits, w.group_size)

    def stored(self, rows: torch.Tensor | None = None) -> GroupQuantized:
        return self.weight if rows is None else self.weight.rows(rows)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight.codes, self.weight.scales, self.weight.offsets]


@dataclass(frozen=True)
class CudaPlatform(Platform):
    name: ClassVar[str] = "cuda"

    def captures_cuda_graphs(self, attention: AttentionBackend) -> bool:
        return attention.supports_cuda_graphs

    def quantized_product(self, weight: QuantizedWeight) -> TritonQuantizedProduct:
        return TritonQuantizedProduct(weight.stored())

    def dense_product(self) -> DenseProduct:
        from kubellm.kernels.gemm import dense_gemm

        return dense_gemm

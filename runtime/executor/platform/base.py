"""`Platform`, torch on any device, and the base the other platforms swap parts of."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kubellm.runtime.executor.platform.cpu_products import KERNELS, cpu_product
from kubellm.runtime.executor.platform.torch_attention import TorchAttentionBackend
from kubellm.runtime.model.attention import AttentionBackend
from kubellm.runtime.model.dense import linear
from kubellm.runtime.model.layer_ops import TORCH_OPS, LayerOps
from kubellm.runtime.model.parallel import DenseProduct, Projection
from kubellm.runtime.model.quantized import QuantizedProduct, QuantizedWeight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Platform:
    """Torch on any device: the reference attention backend (or Triton's kernels, which
    run on CPU under the interpreter), torch's layer ops, and quantized weights
    multiplied exactly, except where `quantized_kernel` names a CPU kernel (torch's int4
    kernel on a CPU without kubellm's kernels)."""

    device: torch.device  # rank 0's; a CUDA group's rank runs on its node's GPU local_rank
    dtype: torch.dtype
    attention_backend: str  # "torch", "triton" or "cpu" (the x86 platform's)
    kv_dtype: torch.dtype
    quantized_kernel: str | None = None  # on CPU: "qgemm" (kubellm's) or "int4pack"
    fast_bf16: bool = False  # bf16 products at least as fast as fp32
    name: ClassVar[str] = "torch"

    def device_of(self, local_rank: int) -> torch.device:
        """The device of the rank with index `local_rank` on its node."""
        if self.device.type != "cuda":
            return self.device
        return torch.device("cuda", local_rank)

    def attention(self) -> AttentionBackend:
        if self.attention_backend == "triton":
            from kubellm.runtime.executor.platform.triton_attention import TritonAttentionBackend

            return TritonAttentionBackend()
        return TorchAttentionBackend()

    def layer_ops(self) -> LayerOps:
        return TORCH_OPS

    @property
    def packs_vocabulary(self) -> bool:
        """Whether the embedding and output head stay quantized: only for kubellm's CPU
        kernel, which multiplies by them as they are (any other product would dequantize
        the whole vocabulary every step)."""
        return self.quantized_kernel == "qgemm"

    def captures_cuda_graphs(self, attention: AttentionBackend) -> bool:
        return False

    def prepare(self, model: nn.Module) -> None:
        """Once the weights are in: each quantized layer into its kernel's storage, and
        every layer's dense product the platform's."""
        quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
        if quantized and self.quantized_kernel is not None:
            logger.info("quantized layers: %s", KERNELS[self.quantized_kernel])
        for weight in quantized:
            weight.use(self.quantized_product(weight))
        product = self.dense_product()
        for layer in model.modules():
            if isinstance(layer, Projection):
                layer.dense_product = product

    def dense_product(self) -> DenseProduct:
        """How layers multiply by a dense weight: torch's product, in its fastest form."""
        return linear

    def quantized_product(self, weight: QuantizedWeight) -> QuantizedProduct | None:
        if self.quantized_kernel is None or weight.codes.device.type != "cpu":
            return None
        dense = self.dtype if self.dtype != torch.bfloat16 or self.fast_bf16 else torch.float32
        return cpu_product(weight, self.quantized_kernel, dense)

"""The x86 platform: kubellm's C kernels (`kubellm/kernels`) on a CPU with AVX2, FMA and
F16C and a C compiler. Quantized layers multiply through its int8 kernel (`QgemmProduct`);
with fp32 activations a layer's small ops run in it too (`CpuOps`: one call each where
torch makes several; at decode sizes a layer's time there is mostly torch's per-op
overhead), attention through the `cpu` backend, and a decode step through each layer
whose every piece runs in them as one call (`x86_layer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kubellm.kernels import cpu_ops
from kubellm.runtime.executor.platform.base import Platform
from kubellm.runtime.executor.platform.cpu_attention import CpuAttentionBackend
from kubellm.runtime.executor.platform.x86_layer import fused_step, whole_decode
from kubellm.runtime.model.attention import AttentionBackend
from kubellm.runtime.model.layer_ops import TORCH_OPS, LayerOps
from kubellm.runtime.model.rope import RopeTables


class CpuOps:
    """`TorchOps`' operations by kubellm's C kernels (fp32); `residual` is summed into
    in place, and `rotate` rotates x in place."""

    add_rms_norm = staticmethod(cpu_ops.add_rms_norm)

    @staticmethod
    def rotate(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        return cpu_ops.rotate_(x, rope.cos, rope.sin)

    silu_and_mul = staticmethod(cpu_ops.silu_and_mul)
    decode_step = staticmethod(fused_step)


@dataclass(frozen=True)
class X86Platform(Platform):
    name: ClassVar[str] = "x86"

    def attention(self) -> AttentionBackend:
        if self.attention_backend == "cpu":
            return CpuAttentionBackend()
        return super().attention()

    def layer_ops(self) -> LayerOps:
        return CpuOps() if self.dtype == torch.float32 else TORCH_OPS

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        if self.dtype == torch.float32:
            for layer in model.held_layers:
                layer.whole_decode = whole_decode(layer)

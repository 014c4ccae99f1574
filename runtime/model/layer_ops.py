"""A decoder layer's small operations (RMSNorm with its residual add, rotary embeddings,
SiLU(gate) * up) in two forms: torch's, for any device and dtype, and kubellm's C
kernels (`kernels/cpu_ops.py`: fp32 on CPU, one call each where torch makes several;
at decode sizes a layer's time there is mostly torch's per-op overhead). The model is
built with one of them; the torch form is the C kernels' test oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kubellm.kernels import cpu_ops
from kubellm.runtime.model.rope import RopeTables, rotate


class TorchOps:
    @staticmethod
    def add_rms_norm(
        x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual) * weight, x + residual), as Hugging Face's: the sum
        normalized in fp32, cast back, then scaled. With no residual, x itself."""
        if residual is not None:
            x = residual + x
        normed = F.rms_norm(x.float(), weight.shape, eps=eps)
        return weight * normed.to(x.dtype), x

    @staticmethod
    def rotate(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        """x [tokens, heads, head_dim] rotated by its tokens' positions."""
        return rotate(x, rope)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuOps:
    """The same operations by kubellm's C kernels; `residual` is summed into in place,
    and `rotate` rotates x in place."""

    add_rms_norm = staticmethod(cpu_ops.add_rms_norm)

    @staticmethod
    def rotate(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        return cpu_ops.rotate_(x, rope.cos, rope.sin)

    silu_and_mul = staticmethod(cpu_ops.silu_and_mul)


LayerOps = type[TorchOps] | type[CpuOps]


def layer_ops(fused_cpu_ops: bool) -> LayerOps:
    return CpuOps if fused_cpu_ops else TorchOps

"""A decoder layer's small operations (RMSNorm with its residual add, rotary embeddings,
SiLU(gate) * up) and a decode step's whole-layer form: the interface a platform fills
(`executor/platform`), and torch's form, for any device and dtype, which is also the
oracle of every other.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from kubellm.runtime.model.attention import AttentionMetadata
from kubellm.runtime.model.rope import RopeTables, rotate


class LayerOps(Protocol):
    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rotate(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor: ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def decode_step(
        self, rope: RopeTables, meta: AttentionMetadata, kv_cache: torch.Tensor, tokens: int
    ) -> Any:
        """What layers with a `whole_decode` read in this step; None runs every layer
        module by module."""


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

    @staticmethod
    def decode_step(rope, meta, kv_cache, tokens) -> None:
        return None


TORCH_OPS = TorchOps()

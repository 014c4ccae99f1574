"""Rotary position embeddings, with Llama-3 and linear frequency scaling."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths are divided by `factor`, short ones kept,
    the band between them interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RopeTables(NamedTuple):
    """cos and signed sin of a step's positions, [tokens, 1, head_dim] each."""

    cos: torch.Tensor
    sin: torch.Tensor


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin for every position, in the 'rotate half' layout of HF. `sin`
    is stored signed (its first half negated), so that rotating is `x * cos + roll(x) *
    sin`: the same products and sums as HF's `x * cos + rotate_half(x) * sin`, in fewer ops.
    """

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the tables in place, e.g. after the model was built on the meta device."""
        if self.cos.is_meta:
            return
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        self.cos.copy_(torch.cat([freqs, freqs], dim=-1).cos())
        self.sin.copy_(torch.cat([-freqs.sin(), freqs.sin()], dim=-1))

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """The tables of these positions in `dtype` (HF casts them to the activations')."""
        cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)
        return RopeTables(cos.unsqueeze(1), sin.unsqueeze(1))


def rotate(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """x [tokens, heads, head_dim] rotated by its tokens' positions."""
    return x * rope.cos + x.roll(x.shape[-1] // 2, -1) * rope.sin

"""Where and in what precision the model runs: device, dtype and attention backend,
resolved once from the engine's settings (every tensor-parallel rank resolves the same)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kubellm.runtime.config import EngineConfig


@dataclass(frozen=True)
class Placement:
    device: torch.device  # rank 0's; rank r of a CUDA group runs on GPU r
    dtype: torch.dtype
    attention_backend: str

    def device_of(self, rank: int, world_size: int) -> torch.device:
        if world_size == 1 or self.device.type != "cuda":
            return self.device
        return torch.device("cuda", rank)


def resolve_placement(config: EngineConfig) -> Placement:
    """Raise ValueError when the tensor-parallel size asks for more GPUs than are visible."""
    device = resolve_device(config.device)
    tp = config.tensor_parallel_size
    if device.type == "cuda" and tp > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel_size {tp} needs {tp} GPUs, but {torch.cuda.device_count()} "
            f"are visible: lower tensor_parallel_size or give the pod more GPUs"
        )
    return Placement(
        device,
        resolve_dtype(config.dtype, device),
        resolve_attention_backend(config.attention_backend, device),
    )


def resolve_device(name: str) -> torch.device:
    """auto: $KUBELLM_DEVICE when set (as for `kubellm serve --device`), else CUDA when
    there is a GPU, else CPU."""
    if name == "auto":
        name = os.environ.get("KUBELLM_DEVICE", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" else "torch"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)  # one of DTYPES: EngineConfig checked it
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32

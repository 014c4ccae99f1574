"""Attention backends: one interface over the paged KV cache, several implementations."""

from kubellm.runtime.attention.backend import AttentionBackend, AttentionMetadata
from kubellm.runtime.attention.torch_backend import TorchAttentionBackend
from kubellm.runtime.config import ATTENTION_BACKENDS

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "TorchAttentionBackend",
    "get_backend",
]


def get_backend(name: str) -> AttentionBackend:
    """ "torch" (the reference, any device), "triton" (kernels; CUDA, or the interpreter)
    or "cpu" (kubellm's C kernels: fp32 on CPU)."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        from kubellm.runtime.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    if name == "triton":
        from kubellm.runtime.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(
        f"unknown attention backend {name!r}; choose one of {list(ATTENTION_BACKENDS)}"
    )

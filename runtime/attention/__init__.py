"""Attention backends: one interface over the paged KV cache, several implementations."""

from kubellm.runtime.attention.backend import AttentionBackend, AttentionMetadata
from kubellm.runtime.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend", "get_backend"]


def get_backend(name: str) -> AttentionBackend:
    backends = {"torch": TorchAttentionBackend}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(backends)}")
    return backends[name]()

"""Small helpers shared by test packages."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import torch

# Where Triton kernels run in tests: the GPU when there is one, else the interpreter on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: Callable[[], Any], timeout: float = 30, message: str = "") -> Any:
    """Poll `what` until it returns something truthy (and return that), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message or what}")


def random_group_quantized(rows: int, cols: int, bits: int, group: int, seed: int):
    """A random `GroupQuantized` weight [rows, cols] (4-bit or signed 8-bit codes) whose
    scales and offsets are fp16 values, as kubellm's CPU kernel stores them."""
    from kubellm.runtime.model.quantized import GroupQuantized

    generator = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
    else:
        codes = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=generator)
    scales = (torch.rand(rows, cols // group, generator=generator) * 0.02 + 0.001).half()
    offsets = (torch.randn(rows, cols // group, generator=generator) * 0.05).half()
    return GroupQuantized(codes, scales.float(), offsets.float(), bits, group)

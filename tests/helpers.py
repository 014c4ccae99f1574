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

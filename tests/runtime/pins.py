"""The settings the suite's engines are built with, passed as settings (the library
reads no environment; only `kubellm serve` and `kubellm generate` read KUBELLM_*, and
conftest sets those for the servers tests start).

PINS, the oracles': CPU (also on a machine with a GPU: the cuda-marked tests name
their device), fp32 by name whatever `auto` would choose on this CPU, and quantized
weights dequantized at load unless a test names the method. DEFAULTS: `make serve`'s
settings, on the suite's device."""

from __future__ import annotations

from typing import Any

PINS: dict[str, Any] = {"device": "cpu", "dtype": "float32", "quantization": "none"}
DEFAULTS: dict[str, Any] = {"device": "cpu"}


def pinned(**settings: Any) -> dict[str, Any]:
    """`settings` over the oracles' pins."""
    return {**PINS, **settings}


def defaults(**settings: Any) -> dict[str, Any]:
    """`settings` over `make serve`'s defaults."""
    return {**DEFAULTS, **settings}

"""The settings the suite's engines are built with, passed as settings (the library
reads no environment; only `kubellm serve` and `kubellm generate` read KUBELLM_*, and
conftest sets those for the servers tests start).

PINS, the oracles': CPU (also on a machine with a GPU: the cuda-marked tests name
their device), fp32 by name whatever `auto` would choose on this CPU, and quantized
weights dequantized at load unless a test names the method. DEFAULTS: `make serve`'s
settings, on the suite's device."""

from __future__ import annotations

from typing import Any

from kubellm.kernels import cpu_library
from kubellm.runtime import LLM
from kubellm.runtime.executor.platform.cpu_products import Int4PackProduct

PINS: dict[str, Any] = {"device": "cpu", "dtype": "float32", "quantization": "none"}
DEFAULTS: dict[str, Any] = {"device": "cpu"}


def pinned(**settings: Any) -> dict[str, Any]:
    """`settings` over the oracles' pins."""
    return {**PINS, **settings}


def defaults(**settings: Any) -> dict[str, Any]:
    """`settings` over `make serve`'s defaults."""
    return {**DEFAULTS, **settings}


def assert_on_the_default_cpu_path(llm: LLM) -> None:
    """The engine runs what `make serve` runs on this machine: kubellm's C kernels where
    they can be built (decode steps a C call per layer), else torch's int4 kernel and
    attention (as `test_fallback_path` makes them, with no compiler)."""
    layer = llm.engine.runner.model.layers[0]
    if cpu_library.unavailable() is None:
        assert layer.whole_decode is not None
    else:
        assert layer.whole_decode is None
        assert isinstance(layer.mlp.gate_up_proj.weight.product, Int4PackProduct)

"""Structural-schema defaulting, as the API server does it, from the CRD's own schema.

The operator fills defaults itself so that what it builds is the same whether or not
an API server (or a test emulator) defaulted the object first.
"""

from __future__ import annotations

import copy
from typing import Any

from kubellm.operator.crd import SPEC, Schema


def with_defaults(spec: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `spec` with every absent defaulted field filled in."""
    return _fill(copy.deepcopy(spec) if spec else {}, SPEC)


def _fill(value: Any, schema: Schema) -> Any:
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    for name, prop in schema["properties"].items():
        if name not in value and "default" in prop:
            value[name] = copy.deepcopy(prop["default"])
        if name in value:
            value[name] = _fill(value[name], prop)
    return value

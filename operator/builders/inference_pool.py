"""A Gateway API Inference Extension InferencePool (`spec.routing.inferencePool`): the
replicas' pods on port 8000, for a gateway whose endpoint picker (deployed by the user)
reads their `/metrics` (the `kubellm:` names; docs/serving.md gives the picker's flags)."""

from __future__ import annotations

from typing import Any

from kubellm.operator.builders.deployment import serving_labels
from kubellm.operator.naming import RUNTIME_PORT, child_metadata

API_VERSION = "inference.networking.k8s.io/v1"


def build_inference_pool(cr: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    picker = spec["routing"]["endpointPicker"]
    return {
        "apiVersion": API_VERSION,
        "kind": "InferencePool",
        "metadata": child_metadata(cr),
        "spec": {
            "selector": {"matchLabels": serving_labels(name, spec)},
            "targetPorts": [{"number": RUNTIME_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": picker.get("name") or f"{name}-epp",
                "port": {"number": picker["port"]},
                "failureMode": picker["failureMode"],
            },
        },
    }

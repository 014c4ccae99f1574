"""The Service in front of an LLMDeployment's pods (port `spec.service.port` -> 8000)."""

from __future__ import annotations

from typing import Any

from kubellm.operator.naming import RUNTIME_PORT_NAME, child_metadata, selector_labels


def build_service(cr: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    port = {
        "name": RUNTIME_PORT_NAME,
        "port": spec["service"]["port"],
        "targetPort": RUNTIME_PORT_NAME,
        "protocol": "TCP",
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(cr),
        "spec": {
            "type": spec["service"]["type"],
            "selector": selector_labels(cr["metadata"]["name"]),
            "ports": [port],
        },
    }

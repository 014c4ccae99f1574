"""The Services of an LLMDeployment.

`<name>` (port `spec.service.port` -> 8000) is the user's endpoint: it selects the
router pods when requests are routed, else the replicas themselves. `<name>-replicas`,
headless, exists only when routed: its EndpointSlices are how the router finds the
replicas (`kubellm route --discover`). Both select only the pods that serve the API: with
a LeaderWorkerSet, each group's leader.
"""

from __future__ import annotations

from typing import Any

from kubellm.operator.builders.deployment import serving_labels
from kubellm.operator.naming import (
    RUNTIME_PORT,
    RUNTIME_PORT_NAME,
    child_metadata,
    replicas_service_name,
    router_selector_labels,
)


def routed(spec: dict[str, Any]) -> bool:
    return spec["routing"]["policy"] != "none"


def build_service(cr: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    selector = router_selector_labels(name) if routed(spec) else serving_labels(name, spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(cr),
        "spec": {
            "type": spec["service"]["type"],
            "selector": selector,
            "ports": [_port(spec["service"]["port"])],
        },
    }


def build_replicas_service(cr: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(cr, replicas_service_name(name)),
        "spec": {
            "clusterIP": "None",
            "selector": serving_labels(name, spec),
            "ports": [_port(RUNTIME_PORT)],
        },
    }


def _port(port: int) -> dict[str, Any]:
    return {
        "name": RUNTIME_PORT_NAME,
        "port": port,
        "targetPort": RUNTIME_PORT_NAME,
        "protocol": "TCP",
    }

"""Names and labels shared by every child of an LLMDeployment."""

from __future__ import annotations

from typing import Any

from kubellm.operator.crd import GROUP, KIND, VERSION

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
TEMPLATE_HASH = f"{GROUP}/template-hash"  # on the pod template: changes roll the pods
RUNTIME_PORT = 8000
RUNTIME_PORT_NAME = "http"


def selector_labels(name: str) -> dict[str, str]:
    """What the Deployment, Service and PDB select pods by (never changes for a CR)."""
    return {NAME_LABEL: "kubellm", INSTANCE_LABEL: name}


def router_selector_labels(name: str) -> dict[str, str]:
    """What the router's Deployment and the `<name>` Service select router pods by
    (another name label, so the replicas' selector never matches a router pod)."""
    return {NAME_LABEL: "kubellm-router", INSTANCE_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return _common_labels(selector_labels(name), "runtime")


def router_labels(name: str) -> dict[str, str]:
    return _common_labels(router_selector_labels(name), "router")


def _common_labels(selector: dict[str, str], component: str) -> dict[str, str]:
    return {
        **selector,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kubellm",
        **managed_by(),
    }


def managed_by() -> dict[str, str]:
    """The label the operator finds its own children by."""
    return {"app.kubernetes.io/managed-by": "kubellm-operator"}


def selector_string(name: str) -> str:
    """The scale subresource's label selector (status.selector)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def cache_claim_name(name: str) -> str:
    return f"{name}-model-cache"


def router_name(name: str) -> str:
    """The router's Deployment, ServiceAccount, Role and RoleBinding."""
    return f"{name}-router"


def replicas_service_name(name: str) -> str:
    """The headless Service whose EndpointSlices the router discovers replicas from."""
    return f"{name}-replicas"


def endpoint(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc/v1"


def owner_reference(cr: dict[str, Any]) -> dict[str, Any]:
    """Makes the CR the controller of a child, so Kubernetes deletes the child with it."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": cr["metadata"]["name"],
        "uid": cr["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(
    cr: dict[str, Any], name: str | None = None, child_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta = cr["metadata"]
    return {
        "name": name or meta["name"],
        "namespace": meta["namespace"],
        "labels": child_labels or labels(meta["name"]),
        "ownerReferences": [owner_reference(cr)],
    }

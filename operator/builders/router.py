"""The router in front of an LLMDeployment's replicas (`spec.routing.policy` other than
none): `kubellm route --discover <name>-replicas` in a Deployment of its own, CPU only,
and a ServiceAccount whose Role allows exactly what discovery does: list and watch the
namespace's EndpointSlices.

Two router pods once the model has more than one replica (a router is then no single
point of failure); they route alike, since the choice is a pure function of the replica
set and its metrics.
"""

from __future__ import annotations

from typing import Any

from kubellm.operator.builders.deployment import CONTAINER_SECURITY_CONTEXT, PRE_STOP_SECONDS
from kubellm.operator.naming import (
    RUNTIME_PORT,
    RUNTIME_PORT_NAME,
    child_metadata,
    replicas_service_name,
    router_labels,
    router_name,
    router_selector_labels,
)

ROUTER_UID = 10001  # the operator image's user
DRAIN_SECONDS = 60  # aiohttp's graceful shutdown waits this long for open requests
RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
DISCOVERY_RULES = [
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["list", "watch"],
    },
]


def router_replicas(spec: dict[str, Any]) -> int:
    """Two (one may be drained or lost) once there can be more than one replica; an
    autoscaled resource's count does not follow its load, so routers never churn."""
    autoscaling = spec.get("autoscaling")
    most = autoscaling["maxReplicas"] if autoscaling is not None else spec["replicas"]
    return 2 if most > 1 else 1


def build_router(cr: dict[str, Any], spec: dict[str, Any], image: str) -> list[dict[str, Any]]:
    """The router's ServiceAccount, Role, RoleBinding and Deployment; `image`: the
    operator's own, used unless `spec.routing.image` names one."""
    return [_service_account(cr), _role(cr), _role_binding(cr), _deployment(cr, spec, image)]


def _metadata(cr: dict[str, Any]) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    return child_metadata(cr, router_name(name), router_labels(name))


def _service_account(cr: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(cr)}


def _role(cr: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(cr),
        "rules": DISCOVERY_RULES,
    }


def _role_binding(cr: dict[str, Any]) -> dict[str, Any]:
    meta, account = _metadata(cr), router_name(cr["metadata"]["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": meta["namespace"]}],
    }


def _deployment(cr: dict[str, Any], spec: dict[str, Any], image: str) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    pod = {
        "serviceAccountName": router_name(name),
        "containers": [_container(cr, spec, image)],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": ROUTER_UID,
            "runAsGroup": ROUTER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": PRE_STOP_SECONDS + DRAIN_SECONDS + 5,
        "enableServiceLinks": False,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(cr),
        "spec": {
            "replicas": router_replicas(spec),
            "selector": {"matchLabels": router_selector_labels(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": router_labels(name)}, "spec": pod},
        },
    }


def _container(cr: dict[str, Any], spec: dict[str, Any], image: str) -> dict[str, Any]:
    meta = cr["metadata"]
    env = [
        {
            "name": "KUBELLM_DISCOVER",
            "value": f"{replicas_service_name(meta['name'])}.{meta['namespace']}",
        },
        {"name": "KUBELLM_POLICY", "value": spec["routing"]["policy"]},
        {"name": "KUBELLM_HOST", "value": "0.0.0.0"},
        {"name": "KUBELLM_PORT", "value": str(RUNTIME_PORT)},
    ]
    if spec.get("apiKeySecretRef"):
        ref = spec["apiKeySecretRef"]
        selector = {"name": ref["name"], "key": ref["key"]}
        env.append({"name": "KUBELLM_API_KEY", "valueFrom": {"secretKeyRef": selector}})
    probe = {
        "httpGet": {"path": "/health", "port": RUNTIME_PORT_NAME},
        "periodSeconds": 5,
        "timeoutSeconds": 3,
        "failureThreshold": 3,
    }
    return {
        "name": "router",
        "image": spec["routing"].get("image") or image,
        "command": ["kubellm", "route"],
        "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": RESOURCES,
        "readinessProbe": probe,
        "livenessProbe": {**probe, "periodSeconds": 10},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_SECONDS)]}}},
        "securityContext": CONTAINER_SECURITY_CONTEXT,
    }

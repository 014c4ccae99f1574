"""Pure builders: from an LLMDeployment to the plain dicts of its children."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubellm.operator.builders.cache import build_cache_claim
from kubellm.operator.builders.deployment import (
    build_deployment,
    pods_per_replica,
    uses_cache_claim,
)
from kubellm.operator.builders.disruption import build_disruption_budget
from kubellm.operator.builders.inference_pool import build_inference_pool
from kubellm.operator.builders.leader_worker_set import build_leader_worker_set
from kubellm.operator.builders.router import build_router
from kubellm.operator.builders.service import build_replicas_service, build_service, routed
from kubellm.operator.defaults import with_defaults
from kubellm.operator.naming import replicas_service_name, router_name

ROUTER_KINDS = ("Deployment", "RoleBinding", "Role", "ServiceAccount")


@dataclass
class Children:
    """What should exist for one CR, and which children should not: (kind, name)."""

    desired: list[dict[str, Any]] = field(default_factory=list)
    absent: list[tuple[str, str]] = field(default_factory=list)


def build_children(cr: dict[str, Any], runtime_image: str, router_image: str) -> Children:
    spec = with_defaults(cr.get("spec"))
    name = cr["metadata"]["name"]
    children = Children()
    if uses_cache_claim(spec):
        children.desired.append(build_cache_claim(cr, spec))
    if pods_per_replica(spec) > 1:
        children.desired.append(build_leader_worker_set(cr, spec, runtime_image))
        children.absent.append(("Deployment", name))
    else:
        children.desired.append(build_deployment(cr, spec, runtime_image))
        children.absent.append(("LeaderWorkerSet", name))
    children.desired.append(build_service(cr, spec))
    if routed(spec):
        children.desired.append(build_replicas_service(cr, spec))
        children.desired.extend(build_router(cr, spec, router_image))
    else:
        children.absent.append(("Service", replicas_service_name(name)))
        children.absent.extend((kind, router_name(name)) for kind in ROUTER_KINDS)
    if spec["routing"]["inferencePool"]:
        children.desired.append(build_inference_pool(cr, spec))
    else:
        children.absent.append(("InferencePool", name))
    if spec["replicas"] > 1:
        children.desired.append(build_disruption_budget(cr))
    else:
        children.absent.append(("PodDisruptionBudget", name))
    return children

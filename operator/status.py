"""An LLMDeployment's status, from the status of its workload (the Deployment, or the
LeaderWorkerSet whose groups are its replicas: both count replicas, ready and updated
ones alike) and the problems found.

Conditions (as Kubernetes writes them): Ready, Progressing, Degraded; each keeps its
lastTransitionTime until its status really changes.
"""

from __future__ import annotations

import datetime
from typing import Any

from kubellm.operator.builders.service import routed
from kubellm.operator.naming import endpoint, selector_string
from kubellm.operator.problems import Problem

Condition = dict[str, str]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Written only while requests are routed (router) or autoscaled (autoscaling, by the
# autoscaler: carried over here, removed with spec.autoscaling).
OPTIONAL_FIELDS = ("router", "autoscaling")


def compute_status(
    cr: dict[str, Any],
    spec: dict[str, Any],
    kind: str,
    workload: dict[str, Any] | None,
    problems: list[Problem],
    timestamp: str,
    router: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`kind`: the workload's (Deployment or LeaderWorkerSet); `router`: the router's
    Deployment, when requests are routed (else None)."""
    meta = cr["metadata"]
    observed = (workload or {}).get("status", {})
    desired = spec["replicas"]
    ready = observed.get("readyReplicas", 0)
    router_status = _router_status(spec, router) if routed(spec) else None
    conditions = [
        _ready(desired, ready, spec, problems, router_status),
        _progressing(desired, ready, observed, kind, workload),
        _degraded(problems, observed),
    ]
    previous = {c["type"]: c for c in (cr.get("status") or {}).get("conditions", [])}
    for condition in conditions:
        before = previous.get(condition["type"])
        unchanged = before is not None and before.get("status") == condition["status"]
        condition["lastTransitionTime"] = before["lastTransitionTime"] if unchanged else timestamp
    status: dict[str, Any] = {
        "replicas": observed.get("replicas", 0),
        "readyReplicas": ready,
        "selector": selector_string(meta["name"]),
        "endpoint": endpoint(meta["name"], meta["namespace"]),
        "conditions": conditions,
    }
    if router_status is not None:
        status["router"] = router_status
    autoscaled = (cr.get("status") or {}).get("autoscaling")
    if spec.get("autoscaling") is not None and autoscaled is not None:
        status["autoscaling"] = autoscaled
    if "generation" in meta:
        status["observedGeneration"] = meta["generation"]
    return status


def _router_status(spec: dict[str, Any], router: dict[str, Any] | None) -> dict[str, Any]:
    observed = (router or {}).get("status", {})
    return {
        "policy": spec["routing"]["policy"],
        "replicas": observed.get("replicas", 0),
        "readyReplicas": observed.get("readyReplicas", 0),
    }


def _condition(kind: str, ok: bool, reason: str, message: str) -> Condition:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def _ready(
    desired: int,
    ready: int,
    spec: dict[str, Any],
    problems: list[Problem],
    router: dict[str, Any] | None,
) -> Condition:
    """Ready: the endpoint answers. When routed, that also needs a ready router pod. At
    zero replicas it answers only when a router holds requests while the autoscaler
    starts a replica."""
    if desired == 0:
        if spec.get("autoscaling") is not None and router and router["readyReplicas"] > 0:
            return _condition(
                "Ready",
                True,
                "ScaledToZero",
                "no replica runs while idle; the router holds a request while one starts",
            )
        return _condition("Ready", False, "ScaledToZero", "spec.replicas is 0")
    counted = f"{ready}/{desired} replicas ready"
    if router is not None and router["readyReplicas"] == 0:
        routers = f"; router {router['readyReplicas']}/{router['replicas']} ready"
        return _condition("Ready", False, "RouterNotReady", counted + routers)
    if ready >= desired:
        return _condition("Ready", True, "AllReplicasReady", counted)
    hint = _why_not_ready(spec, problems)
    if ready > 0:
        return _condition("Ready", True, "PartiallyReady", counted + hint)
    return _condition("Ready", False, "ReplicasNotReady", counted + hint)


def _why_not_ready(spec: dict[str, Any], problems: list[Problem]) -> str:
    if problems:
        return f"; {problems[0].message}"
    hint = f"; pods have {spec['probes']['startupTimeoutSeconds']} s to load the model"
    shared_rwo = spec["cache"]["accessMode"] == "ReadWriteOnce" and spec["replicas"] > 1
    if shared_rwo and spec["model"]["source"].startswith("hf://"):
        hint += (
            "; the replicas share a ReadWriteOnce cache, so they can only run on one node "
            "(use cache.accessMode ReadWriteMany to spread them)"
        )
    return hint


def _progressing(
    desired: int,
    ready: int,
    observed: dict[str, Any],
    kind: str,
    workload: dict[str, Any] | None,
) -> Condition:
    if workload is None:
        return _condition("Progressing", True, "Creating", f"creating the {kind}")
    updated = observed.get("updatedReplicas", 0)
    if updated < desired:
        return _condition("Progressing", True, "RollingOut", f"{updated}/{desired} pods updated")
    if ready < desired:
        return _condition("Progressing", True, "Starting", f"{ready}/{desired} pods ready")
    if observed.get("replicas", 0) > desired:
        return _condition("Progressing", True, "ScalingDown", f"{desired} replicas wanted")
    return _condition("Progressing", False, "Complete", "the rollout is complete")


def _degraded(problems: list[Problem], observed: dict[str, Any]) -> Condition:
    if problems:
        message = "; ".join(p.message for p in problems)
        return _condition("Degraded", True, problems[0].reason, message)
    for condition in observed.get("conditions", []):
        stuck = condition.get("reason") == "ProgressDeadlineExceeded"
        failing = condition.get("type") == "ReplicaFailure" and condition.get("status") == "True"
        if stuck or failing:
            return _condition(
                "Degraded",
                True,
                condition.get("reason", "ReplicaFailure"),
                condition.get("message", ""),
            )
    return _condition("Degraded", False, "AsExpected", "no problems found")


def transitions(before: dict[str, Any] | None, after: dict[str, Any]) -> list[Condition]:
    """Conditions whose status changed (what deserves an event)."""
    old = {c["type"]: c["status"] for c in (before or {}).get("conditions", [])}
    return [c for c in after["conditions"] if old.get(c["type"]) != c["status"]]


def status_patch(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """The merge patch from `before` to `after`, or {} when nothing changed. An optional
    field `after` lacks is nulled; others in `before` (kopf's own) are left alone."""
    before = before or {}
    patch = {k: v for k, v in after.items() if before.get(k) != v}
    patch.update({k: None for k in OPTIONAL_FIELDS if k in before and k not in after})
    return patch

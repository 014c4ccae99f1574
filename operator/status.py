"""An LLMDeployment's status, from its Deployment's status and the problems found.

Conditions (as Kubernetes writes them): Ready, Progressing, Degraded; each keeps its
lastTransitionTime until its status really changes.
"""

from __future__ import annotations

import datetime
from typing import Any

from kubellm.operator.naming import endpoint, selector_string
from kubellm.operator.problems import Problem

Condition = dict[str, str]


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compute_status(
    cr: dict[str, Any],
    spec: dict[str, Any],
    deployment: dict[str, Any] | None,
    problems: list[Problem],
    timestamp: str,
) -> dict[str, Any]:
    meta = cr["metadata"]
    observed = (deployment or {}).get("status", {})
    desired = spec["replicas"]
    ready = observed.get("readyReplicas", 0)
    conditions = [
        _ready(desired, ready, spec, problems),
        _progressing(desired, ready, observed, deployment),
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
    if "generation" in meta:
        status["observedGeneration"] = meta["generation"]
    return status


def _condition(kind: str, ok: bool, reason: str, message: str) -> Condition:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason,
            "message": message}  # fmt: skip


def _ready(desired: int, ready: int, spec: dict[str, Any], problems: list[Problem]) -> Condition:
    if desired == 0:
        return _condition("Ready", False, "ScaledToZero", "spec.replicas is 0")
    counted = f"{ready}/{desired} replicas ready"
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
    desired: int, ready: int, observed: dict[str, Any], deployment: dict[str, Any] | None
) -> Condition:
    if deployment is None:
        return _condition("Progressing", True, "Creating", "creating the Deployment")
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
                "Degraded", True, condition.get("reason", "ReplicaFailure"),
                condition.get("message", ""),
            )  # fmt: skip
    return _condition("Degraded", False, "AsExpected", "no problems found")


def transitions(before: dict[str, Any] | None, after: dict[str, Any]) -> list[Condition]:
    """Conditions whose status changed (what deserves an event)."""
    old = {c["type"]: c["status"] for c in (before or {}).get("conditions", [])}
    return [c for c in after["conditions"] if old.get(c["type"]) != c["status"]]


def same_status(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    return {k: (before or {}).get(k) for k in after} == after

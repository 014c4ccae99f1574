"""The autoscaler's loop: every `interval` seconds, each LLMDeployment with
`spec.autoscaling` gets its load read (`load.py`), a decision (`autoscale.decide`),
`spec.replicas` set through the scale subresource when the decision differs, an event
for each change, and `status.autoscaling` written (the decision's window with it, so a
restarted operator resumes a scale-down delay instead of forgetting it).

The autoscaler owns `spec.replicas`: a value someone else wrote (`kubectl scale`) is
set back at the next evaluation, with a warning event. It stands aside while the
resource's autoscaling is invalid or a HorizontalPodAutoscaler targets it too (those
are reported as `Degraded` by the reconcile, which `refresh` runs).

One task for all resources, not a kopf timer per resource: timers put a finalizer on
every resource, so deleting one would hang whenever the operator is not running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import kopf

from kubellm.operator.autoscale import (
    Bounds,
    Decision,
    clamp,
    decide,
    window_from_status,
    window_to_status,
)
from kubellm.operator.builders.deployment import workload_kind
from kubellm.operator.crd import KIND
from kubellm.operator.defaults import with_defaults
from kubellm.operator.kube import Kube, object_path
from kubellm.operator.load import Load, read_load
from kubellm.operator.problems import (
    CONFLICT_WORDS,
    autoscaler_conflicts,
    autoscaling_problems,
)
from kubellm.operator.status import now as timestamp

INTERVAL_SECONDS = 10.0
logger = logging.getLogger("kubellm.operator")
Key = tuple[str, str]  # (namespace, name)


class Autoscaler:
    """Evaluates the resources it follows; `refresh(cr)` reconciles one whose status
    must say why the autoscaler stands aside."""

    def __init__(
        self, kube: Kube, interval: float, refresh: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        self.kube, self.interval, self.refresh = kube, interval, refresh
        self.followed: set[Key] = set()
        self.task: asyncio.Task | None = None

    def follow(self, key: Key) -> None:
        """Called from a handler, so the task inherits the context kopf posts events from."""
        self.followed.add(key)
        if self.task is None:
            self.task = asyncio.create_task(self._run())

    def forget(self, key: Key) -> None:
        self.followed.discard(key)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(self.interval)
                await asyncio.gather(*(self._evaluate(session, key) for key in list(self.followed)))

    async def _evaluate(self, session: aiohttp.ClientSession, key: Key) -> None:
        try:
            cr = await self.kube.get(object_path(KIND, *key))
            if cr is None or (cr.get("spec") or {}).get("autoscaling") is None:
                self.forget(key)
            elif not await self._stands_aside(cr):
                await evaluate(self.kube, session, cr, time.time())
        except Exception:  # keep scaling the others
            logger.exception("autoscaling %s/%s failed", *key)

    async def _stands_aside(self, cr: dict[str, Any]) -> bool:
        spec, meta = with_defaults(cr["spec"]), cr["metadata"]
        if autoscaling_problems(spec):
            return True
        conflicts = await autoscaler_conflicts(self.kube, meta["namespace"], meta["name"])
        if _reported(cr) != {p.message for p in conflicts}:
            await self.refresh(cr)
        return bool(conflicts)


async def start(kube: Kube, cr: dict[str, Any], now: float) -> dict[str, Any]:
    """Take over spec.replicas of a resource not evaluated before: a new one starts at
    minReplicas (no pod starts only to be stopped at the first evaluation), one already
    running keeps its count within the bounds, and the delay applies to lowering it.
    The resource as it is now."""
    meta, spec = cr["metadata"], with_defaults(cr["spec"])
    bounds = Bounds.from_spec(spec["autoscaling"])
    running = await kube.get(object_path(workload_kind(spec), meta["namespace"], meta["name"]))
    replicas = clamp(bounds, spec["replicas"]) if running else bounds.min_replicas
    if replicas != spec["replicas"]:
        path = object_path(KIND, meta["namespace"], meta["name"], "scale")
        await kube.merge_patch(path, {"spec": {"replicas": replicas}})
    saved = {
        "heldRequests": 0,
        "desiredReplicas": replicas,
        "reason": "Started",
        "window": window_to_status(((now, replicas),)),
    }
    path = object_path(KIND, meta["namespace"], meta["name"], "status")
    await kube.merge_patch(path, {"status": {"autoscaling": saved}})
    return {
        **cr,
        "spec": {**cr["spec"], "replicas": replicas},
        "status": {**(cr.get("status") or {}), "autoscaling": saved},
    }


def _reported(cr: dict[str, Any]) -> set[str]:
    """The conflicts the Degraded condition reports now (one message each)."""
    conditions = (cr.get("status") or {}).get("conditions", [])
    degraded = next((c for c in conditions if c["type"] == "Degraded"), {})
    if degraded.get("status") != "True":
        return set()
    return {m for m in degraded.get("message", "").split("; ") if CONFLICT_WORDS in m}


async def evaluate(
    kube: Kube, session: aiohttp.ClientSession, cr: dict[str, Any], now: float
) -> Decision:
    """One evaluation of one resource; the decision it acted on."""
    meta, spec = cr["metadata"], with_defaults(cr["spec"])
    saved = (cr.get("status") or {}).get("autoscaling") or {}
    owned = saved.get("desiredReplicas")  # what the autoscaler last set
    current = owned if owned is not None else spec["replicas"]
    load = await read_load(kube, session, meta["namespace"], meta["name"], spec)
    window = window_from_status(saved.get("window"))
    decision = decide(
        Bounds.from_spec(spec["autoscaling"]), current, load.requests, load.held, window, now
    )
    scaled = spec["replicas"] != decision.desired
    if scaled:
        path = object_path(KIND, meta["namespace"], meta["name"], "scale")
        await kube.merge_patch(path, {"spec": {"replicas": decision.desired}})
        _announce(cr, spec["replicas"], current, decision, load, spec["autoscaling"])
    status = _status(saved, decision, load, scaled)
    if status != saved:
        path = object_path(KIND, meta["namespace"], meta["name"], "status")
        await kube.merge_patch(path, {"status": {"autoscaling": _nulled(saved, status)}})
    return decision


def _status(saved: dict[str, Any], decision: Decision, load: Load, scaled: bool) -> dict[str, Any]:
    status = {
        "heldRequests": load.held,
        "desiredReplicas": decision.desired,
        "reason": decision.reason,
        "window": window_to_status(decision.window),
    }
    if load.requests is not None:
        status["load"] = load.requests
    last = timestamp() if scaled else saved.get("lastScaleTime")
    if last is not None:
        status["lastScaleTime"] = last
    return status


def _nulled(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that also removes what `after` dropped (a load no longer read)."""
    return {**{k: None for k in before if k not in after}, **after}


def _announce(
    cr: dict[str, Any],
    written: int,
    current: int,
    decision: Decision,
    load: Load,
    autoscaling: dict[str, Any],
) -> None:
    if written != current:
        kopf.event(
            cr,
            type="Warning",
            reason="ReplicasOverwritten",
            message=(
                f"spec.replicas was set to {written} outside the autoscaler, which owns it while "
                f"spec.autoscaling is set: set back to {decision.desired}; change "
                "autoscaling.minReplicas or maxReplicas instead"
            ),
        )
        return
    seen = "unknown" if load.requests is None else f"{load.requests} requests"
    message = (
        f"{current} -> {decision.desired} replicas: load {seen} ({load.held} held), "
        f"target {autoscaling['targetRequests']} per replica"
    )
    kopf.event(cr, type="Normal", reason=decision.reason, message=message)

"""kopf handlers: converge an LLMDeployment's children, and follow the status of the
Deployment or LeaderWorkerSet that runs its replicas.

Run by `kubellm operator` (or `kopf run -m kubellm.operator.handlers`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import kopf

from kubellm import __version__
from kubellm.operator.autoscaler import INTERVAL_SECONDS, Autoscaler
from kubellm.operator.autoscaler import start as start_autoscaling
from kubellm.operator.builders import build_children
from kubellm.operator.builders.deployment import workload_kind
from kubellm.operator.builders.service import routed
from kubellm.operator.converge import apply, remove
from kubellm.operator.crd import GROUP, KIND, PLURAL, VERSION
from kubellm.operator.defaults import with_defaults
from kubellm.operator.kube import Kube, KubeError, object_path
from kubellm.operator.naming import managed_by, router_name
from kubellm.operator.problems import (
    AUTOSCALING_REASONS,
    CLUSTER_REASONS,
    Problem,
    blocking,
    find_problems,
)
from kubellm.operator.status import compute_status, now, status_patch, transitions

DEFAULT_RUNTIME_IMAGE = f"ghcr.io/kubellm/kubellm-runtime:{__version__}"
DEFAULT_OPERATOR_IMAGE = f"ghcr.io/kubellm/kubellm-operator:{__version__}"  # runs routers too
RECHECK_SECONDS = 60.0  # how often a resource waiting on a Secret or claim looks again


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own events say what happened
    memo.kube = Kube.login(settings)
    memo.image = os.environ.get("KUBELLM_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE)
    memo.router_image = os.environ.get("KUBELLM_OPERATOR_IMAGE", DEFAULT_OPERATOR_IMAGE)
    interval = float(os.environ.get("KUBELLM_OPERATOR_RECHECK_SECONDS", RECHECK_SECONDS))
    memo.rechecker = Rechecker(interval)
    autoscale_every = float(os.environ.get("KUBELLM_AUTOSCALE_INTERVAL_SECONDS", INTERVAL_SECONDS))
    logger = logging.getLogger("kubellm.operator")
    memo.autoscaler = Autoscaler(
        memo.kube, autoscale_every, lambda cr: reconcile_resource(cr, memo, logger)
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.rechecker.stop()
    memo.autoscaler.stop()
    await memo.kube.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Create, update and resume all converge on the builders' output."""
    await reconcile_resource(_plain(body), memo, logger)


async def reconcile_resource(cr: dict[str, Any], memo: kopf.Memo, logger: Any) -> None:
    """A resource that cannot work is reported (Degraded), not retried in a loop: the
    handler succeeds, so the next spec change is handled at once; one waiting on the
    cluster (a Secret or claim that may appear) is looked at again by the Rechecker."""
    spec = with_defaults(cr.get("spec"))
    key = (cr["metadata"]["namespace"], cr["metadata"]["name"])
    problems = await find_problems(memo.kube, key[0], key[1], spec)
    if _autoscaler_starts(spec, cr, problems):
        cr = await start_autoscaling(memo.kube, cr, time.time())
        spec = with_defaults(cr["spec"])
    if blocking(problems):
        logger.warning("not converging: %s", "; ".join(p.message for p in problems))
    else:
        for problem in problems:
            logger.warning("%s", problem.message)
        await _converge(memo, cr, logger, skip={p.reason for p in problems})
    if any(p.reason in CLUSTER_REASONS for p in problems):
        memo.rechecker.watch(key, memo)
    else:
        memo.rechecker.waiting.discard(key)
    if spec.get("autoscaling") is not None:
        memo.autoscaler.follow(key)
    else:
        memo.autoscaler.forget(key)
    await refresh_status(memo.kube, cr, spec, problems)


def _autoscaler_starts(spec: dict[str, Any], cr: dict[str, Any], problems: list[Problem]) -> bool:
    """Whether the autoscaler takes over spec.replicas now: it is asked to, has not yet,
    and nothing stops it (invalid bounds, another autoscaler)."""
    evaluated = (cr.get("status") or {}).get("autoscaling") is not None
    stopped = any(p.reason in AUTOSCALING_REASONS for p in problems)
    return spec.get("autoscaling") is not None and not evaluated and not stopped


class Rechecker:
    """Looks again, every `interval` seconds, at resources waiting on the cluster. (A kopf
    timer would do this too, but timers put a finalizer on every resource.) Its task is
    started from a handler, so it inherits the context kopf posts events from."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.waiting: set[tuple[str, str]] = set()  # (namespace, name)
        self.task: asyncio.Task | None = None

    def watch(self, key: tuple[str, str], memo: kopf.Memo) -> None:
        self.waiting.add(key)
        if self.task is None:
            self.task = asyncio.create_task(self._run(memo))

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self, memo: kopf.Memo) -> None:
        logger = logging.getLogger("kubellm.operator")
        while True:
            await asyncio.sleep(self.interval)
            for namespace, name in list(self.waiting):
                cr = await memo.kube.get(object_path(KIND, namespace, name))
                if cr is None:
                    self.waiting.discard((namespace, name))
                    continue
                try:
                    await reconcile_resource(cr, memo, logger)
                except Exception:  # keep looking after the others
                    logger.exception("rechecking %s/%s failed", namespace, name)


@kopf.on.event("apps", "v1", "deployments", labels=managed_by())
@kopf.on.event("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels=managed_by())
async def workload_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A child Deployment or LeaderWorkerSet moved (pods became ready, a rollout
    progressed): update the owner's status. (kopf serves the LeaderWorkerSet handler
    once the cluster has that API.)"""
    owner = next((o for o in body.metadata.get("ownerReferences", []) if o["kind"] == KIND), None)
    if owner is None:
        return
    namespace = body.metadata.namespace
    cr = await memo.kube.get(object_path(KIND, namespace, owner["name"]))
    if cr is None:
        return
    spec = with_defaults(cr.get("spec"))
    problems = await find_problems(memo.kube, namespace, owner["name"], spec)
    await refresh_status(memo.kube, cr, spec, problems)


async def _converge(
    memo: kopf.Memo, cr: dict[str, Any], logger: kopf.Logger, skip: set[str]
) -> None:
    """`skip`: partial problems' reasons; an InferencePool is left out while its API is."""
    children = build_children(cr, memo.image, memo.router_image)
    for obj in children.desired:
        if obj["kind"] == "InferencePool" and "InferencePoolAPIMissing" in skip:
            continue
        try:
            result = await apply(memo.kube, obj)
        except KubeError as exc:
            if obj["kind"] != "PersistentVolumeClaim" or exc.status not in (403, 422):
                raise
            _cache_not_resized(cr, obj, exc, logger)
            continue
        if result != "unchanged":
            logger.info("%s %s %s", obj["kind"], obj["metadata"]["name"], result)
    for kind, name in children.absent:
        if await remove(memo.kube, kind, cr["metadata"]["namespace"], name):
            logger.info("%s %s deleted", kind, name)


def _cache_not_resized(
    cr: dict[str, Any], claim: dict[str, Any], exc: KubeError, logger: Any
) -> None:
    """The API server refused to grow the cache claim (its StorageClass does not allow
    volume expansion): the model still serves from the claim as it is, so say so and go on."""
    size = claim["spec"]["resources"]["requests"]["storage"]
    message = f"the cache claim {claim['metadata']['name']} was not resized to {size}: {exc}"
    logger.warning(message)
    kopf.event(cr, type="Warning", reason="CacheNotResized", message=message)


async def refresh_status(
    kube: Kube, cr: dict[str, Any], spec: dict[str, Any], problems: list[Problem]
) -> None:
    """Write the status if it changed, with an event for each notable transition."""
    meta = cr["metadata"]
    kind = workload_kind(spec)
    workload = await kube.get(object_path(kind, meta["namespace"], meta["name"]))
    router = None
    if routed(spec):
        path = object_path("Deployment", meta["namespace"], router_name(meta["name"]))
        router = await kube.get(path)
    status = compute_status(cr, spec, kind, workload, problems, now(), router)
    patch = status_patch(cr.get("status"), status)
    if not patch:
        return
    path = object_path(KIND, meta["namespace"], meta["name"], "status")
    await kube.merge_patch(path, {"status": patch})
    for condition in transitions(cr.get("status"), status):
        _announce(cr, condition)


def _announce(cr: dict[str, Any], condition: dict[str, str]) -> None:
    """An event per notable transition (kopf.event: posted whatever the posting level,
    which is raised to keep kopf's own handler logs out of the events)."""
    kind, ok, seen = condition["type"], condition["status"] == "True", bool(cr.get("status"))
    message = condition["message"]
    if kind == "Degraded" and ok:
        kopf.event(cr, type="Warning", reason=condition["reason"], message=message)
    elif kind == "Degraded" and seen:
        kopf.event(cr, type="Normal", reason="Recovered", message=message)
    elif kind == "Ready" and ok:
        kopf.event(cr, type="Normal", reason="Ready", message=message)
    elif kind == "Ready" and seen and condition["reason"] != "ScaledToZero":
        kopf.event(cr, type="Warning", reason="NotReady", message=message)


def _plain(body: kopf.Body) -> dict[str, Any]:
    """The resource as a plain dict (what the builders take)."""
    return {
        "apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
        "kind": body.get("kind", KIND),
        "metadata": dict(body.metadata),
        "spec": dict(body.spec),
        "status": dict(body.status),
    }

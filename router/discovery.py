"""`--discover SERVICE`: the replica set from the EndpointSlices of the replicas' Service,
kept current by a watch, so replicas come and go without a restart.

A replica counts once Kubernetes says its endpoint is ready (its readiness probe, so
also not while it terminates); the router's own `/health` poll must then agree before
it takes requests. The watch is listed again from scratch when the API server ends it
with an error (410 Gone: its resourceVersion is too old) or the connection drops.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from kubellm.router.replicas import ReplicaSet

logger = logging.getLogger("kubellm.router")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set on a Service's EndpointSlices
PORT_NAME = "http"  # the replicas' port, as the operator names it
RETRY_SECONDS = 2.0
WATCH_SECONDS = 300  # the API server ends each watch after this; it is then resumed
POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def service_and_namespace(target: str) -> tuple[str, str]:
    """`name` or `name.namespace`; without one, the pod's own namespace (else default)."""
    name, _, namespace = target.partition(".")
    if not namespace:
        exists = POD_NAMESPACE_FILE.exists()
        namespace = POD_NAMESPACE_FILE.read_text().strip() if exists else "default"
    return name, namespace


def ready_urls(endpoint_slice: dict[str, Any]) -> list[str]:
    """The base URLs of an EndpointSlice's ready endpoints, on its `http` port (else its
    first). An endpoint whose `ready` is unset counts as ready, as the API documents."""
    ports = endpoint_slice.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    port = port or (ports[0].get("port") if ports else None)
    if port is None:
        return []
    urls = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses", [])[:1]:
            host = f"[{address}]" if ":" in address else address
            urls.append(f"http://{host}:{port}")
    return urls


class EndpointSliceWatch:
    """Keeps `replicas` equal to the ready endpoints of one Service."""

    def __init__(self, target: str, replicas: ReplicaSet) -> None:
        self.service, self.namespace = service_and_namespace(target)
        self.replicas = replicas
        self.slices: dict[str, list[str]] = {}  # EndpointSlice name -> ready URLs
        self.path = f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices"
        self.selector = f"{SERVICE_NAME_LABEL}={self.service}"

    async def run(self) -> None:
        import kopf  # the operator image's; only discovery needs it

        from kubellm.operator.kube import Kube, KubeError

        kube = Kube.login(kopf.OperatorSettings())
        logger.info("discovering replicas from Service %s/%s", self.namespace, self.service)
        try:
            while True:
                try:
                    await self._list_and_watch(kube)
                except (KubeError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    logger.warning("watching EndpointSlices: %s; again in %g s", exc, RETRY_SECONDS)
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            await kube.close()

    async def _list_and_watch(self, kube: Any) -> None:
        listed = await kube.get(f"{self.path}?{urlencode({'labelSelector': self.selector})}")
        self.slices = {}
        for item in (listed or {}).get("items", []):
            self._apply("ADDED", item)
        self._publish()
        params = {
            "labelSelector": self.selector,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        version = ((listed or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            params["resourceVersion"] = version
        async for event in kube.watch(self.path, params):
            if event.get("type") == "ERROR":
                raise ValueError(f"the watch ended: {event.get('object', {}).get('message')}")
            if self._apply(event.get("type", ""), event.get("object") or {}):
                self._publish()

    def _apply(self, kind: str, endpoint_slice: dict[str, Any]) -> bool:
        """Record one event; whether it concerned this Service's slices."""
        meta = endpoint_slice.get("metadata") or {}
        if (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) != self.service:
            return False  # a BOOKMARK, or (should a selector be ignored) another Service's
        if kind == "DELETED":
            self.slices.pop(meta.get("name"), None)
        else:
            self.slices[meta.get("name")] = ready_urls(endpoint_slice)
        return True

    def _publish(self) -> None:
        urls = sorted({url for urls in self.slices.values() for url in urls})
        before = set(self.replicas.replicas)
        self.replicas.set_urls(urls)
        if set(self.replicas.replicas) != before:
            logger.info("replicas: %s", ", ".join(urls) or "none")

"""An autoscaled LLMDeployment's load, read from its pods' `/metrics` at the addresses
its Services' EndpointSlices list (ready pods only: one that is starting carries none).

The routers count the requests they hold while no replica is ready and those they have
sent on; the replicas count what they run and queue. Both see the same routed requests,
so the load is the held ones plus the larger of the two counts (the replicas' is larger
by the requests that reach them past the routers, e.g. through an InferencePool).
A pod that does not answer makes the load unknown, never lower.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from kubellm.operator.builders.service import routed
from kubellm.operator.kube import Kube, collection_path
from kubellm.operator.naming import replicas_service_name
from kubellm.router.discovery import SERVICE_NAME_LABEL, ready_urls
from kubellm.router.replicas import parse_gauges

ROUTER_GAUGES = {"kubellm:router_queue_length": "held", "kubellm:router_in_flight": "sent"}
REPLICA_GAUGES = {
    "kubellm:num_requests_waiting": "waiting",
    "kubellm:num_requests_running": "running",
}
SCRAPE_SECONDS = 3.0


@dataclass(frozen=True)
class Load:
    requests: int | None  # in-flight plus waiting plus held; None: a pod did not answer
    held: int  # requests the routers hold for want of a ready replica


async def read_load(
    kube: Kube, session: aiohttp.ClientSession, namespace: str, name: str, spec: dict[str, Any]
) -> Load:
    """With a router, its pods sit behind `<name>` and the replicas behind
    `<name>-replicas`; without one, the replicas behind `<name>`."""
    replicas_service = replicas_service_name(name) if routed(spec) else name
    router_urls = await pod_urls(kube, namespace, name) if routed(spec) else []
    replica_urls = await pod_urls(kube, namespace, replicas_service)
    routers, replicas = await asyncio.gather(
        asyncio.gather(*(_scrape(session, url, ROUTER_GAUGES) for url in router_urls)),
        asyncio.gather(*(_scrape(session, url, REPLICA_GAUGES) for url in replica_urls)),
    )
    held = round(sum(r.get("held", 0.0) for r in routers if r is not None))
    unread = None in routers or None in replicas
    if unread or (routed(spec) and not router_urls):  # no router: held requests unseen
        return Load(None, held)
    sent = sum(r.get("sent", 0.0) for r in routers)
    at_replicas = sum(r.get("waiting", 0.0) + r.get("running", 0.0) for r in replicas)
    return Load(held + round(max(sent, at_replicas)), held)


async def pod_urls(kube: Kube, namespace: str, service: str) -> list[str]:
    """The base URLs of a Service's ready endpoints."""
    query = urlencode({"labelSelector": f"{SERVICE_NAME_LABEL}={service}"})
    listed = await kube.get(f"{collection_path('EndpointSlice', namespace)}?{query}")
    return sorted({url for item in (listed or {}).get("items", []) for url in ready_urls(item)})


async def _scrape(
    session: aiohttp.ClientSession, url: str, gauges: dict[str, str]
) -> dict[str, float] | None:
    try:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_SECONDS)
        async with session.get(f"{url}/metrics", timeout=timeout) as response:
            if response.status != 200:
                return None
            return parse_gauges(await response.text(), gauges)
    except (aiohttp.ClientError, TimeoutError):
        return None

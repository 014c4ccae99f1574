"""The replicas a router sends to: their readiness and load, read from each replica's
`/health` and `/metrics` every POLL_SECONDS, plus the router's own in-flight counts and
its record of failures (a replica that fails EJECT_AFTER times in a row is left out for
EJECT_SECONDS, then used again only once its `/health` answers 200)."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

import aiohttp

POLL_SECONDS = 0.5
EJECT_AFTER = 3
EJECT_SECONDS = 10.0
GAUGES = {  # the replica's metric -> Replica's field
    "kubellm:num_requests_waiting": "waiting",
    "kubellm:num_requests_running": "running",
    "kubellm:kv_cache_usage_perc": "kv_usage",
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE)


@dataclass
class Replica:
    url: str
    ready: bool = False  # its /health answered 200 at the last poll, and it is not ejected
    in_flight: int = 0  # this router's requests on it now
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    failures: int = 0  # in a row
    ejected_until: float = 0.0

    def load(self) -> float:
        """Requests on it (the router's own count where its scrape lags), the KV cache's
        fullness breaking ties."""
        return max(self.in_flight, self.waiting + self.running) + self.kv_usage


def parse_gauges(text: str, gauges: dict[str, str] = GAUGES) -> dict[str, float]:
    """The values of `gauges` (metric -> field) in a Prometheus text exposition, each
    summed over its labels."""
    values: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        if name in gauges:
            values[gauges[name]] = values.get(gauges[name], 0.0) + float(value)
    return values


class ReplicaSet:
    """The replicas by URL; `changed` is notified whenever one becomes ready."""

    def __init__(self, urls: list[str]) -> None:
        self.replicas: dict[str, Replica] = {}
        self.changed = asyncio.Condition()
        self.set_urls(urls)

    def set_urls(self, urls: list[str]) -> None:
        """The replica set now (discovery calls this as endpoints come and go)."""
        wanted = [url.rstrip("/") for url in urls]
        self.replicas = {url: self.replicas.get(url) or Replica(url) for url in wanted}

    def loads(self) -> dict[str, float]:
        """Each ready replica's load."""
        return {url: r.load() for url, r in self.replicas.items() if r.ready}

    def succeeded(self, url: str) -> None:
        if url in self.replicas:
            self.replicas[url].failures = 0

    def failed(self, url: str) -> None:
        """A connection refused or reset, or a 503: not ready until its next good poll;
        ejected after EJECT_AFTER failures in a row."""
        replica = self.replicas.get(url)
        if replica is None:
            return
        replica.ready = False
        replica.failures += 1
        if replica.failures >= EJECT_AFTER:
            replica.ejected_until = time.monotonic() + EJECT_SECONDS

    async def poll(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._poll_one(session, r) for r in list(self.replicas.values())))

    async def _poll_one(self, session: aiohttp.ClientSession, replica: Replica) -> None:
        timeout = aiohttp.ClientTimeout(total=2 * POLL_SECONDS + 1)
        try:
            async with session.get(replica.url + "/health", timeout=timeout) as health:
                healthy = health.status == 200
            async with session.get(replica.url + "/metrics", timeout=timeout) as metrics:
                gauges = parse_gauges(await metrics.text()) if metrics.status == 200 else {}
        except (TimeoutError, aiohttp.ClientError):
            healthy, gauges = False, {}
        for field, value in gauges.items():
            setattr(replica, field, value)
        was_ready = replica.ready
        replica.ready = healthy and time.monotonic() >= replica.ejected_until
        if replica.ready and not was_ready:
            async with self.changed:
                self.changed.notify_all()

    async def poll_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.poll(session)
            await asyncio.sleep(POLL_SECONDS)

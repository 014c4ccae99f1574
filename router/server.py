"""The router's HTTP side: every route the replicas serve, passed through to the replica
the policy picks (bodies as they are, streams chunk by chunk), with its own `/health`
and `/metrics`.

A request is retried on another replica, up to `retries` times, only while nothing has
reached its client: when the replica refuses or resets the connection, or answers 503
(loading, draining). A stream cut after that ends with an OpenAI-shaped error event and
`[DONE]`. While no replica is ready a request waits, up to `queue_timeout` seconds and
`max_queue` requests, then gets a 503 with Retry-After. A client that hangs up closes
its upstream connection, which aborts the request on the replica.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from kubellm.router.discovery import EndpointSliceWatch
from kubellm.router.policy import LOAD_FACTOR, choose
from kubellm.router.prefix import PREFIX_CHARS, prefix_key
from kubellm.router.replicas import ReplicaSet

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "content-length",
}
MAX_BODY_BYTES = 32 * 2**20
RETRY_AFTER_SECONDS = 5


@dataclass
class RouterSettings:
    policy: str = "prefix"
    retries: int = 2
    queue_timeout: float = 60.0
    max_queue: int = 1024
    prefix_chars: int = PREFIX_CHARS
    api_key: str | None = None
    load_factor: float = LOAD_FACTOR


@dataclass
class RouterMetrics:
    requests: Counter = field(default_factory=Counter)  # by replica
    decisions: Counter = field(default_factory=Counter)  # by reason
    upstream_errors: Counter = field(default_factory=Counter)  # by replica
    retries: int = 0
    rejected: Counter = field(default_factory=Counter)  # by reason: queue-full, queue-timeout
    queued: int = 0

    def render(self, replicas: ReplicaSet) -> str:
        lines = []

        def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend(
                [f"# HELP kubellm:router_{name} {help_}", f"# TYPE kubellm:router_{name} {kind}"]
            )
            lines.extend(f"kubellm:router_{name}{labels} {value}" for labels, value in samples)

        def by(label: str, counts: Counter) -> list[tuple[str, float]]:
            return [(f'{{{label}="{key}"}}', value) for key, value in sorted(counts.items())]

        family(
            "requests_total",
            "counter",
            "Requests sent to each replica",
            by("replica", self.requests),
        )
        family(
            "decisions_total",
            "counter",
            "Routing decisions by reason",
            by("reason", self.decisions),
        )
        family(
            "upstream_errors_total",
            "counter",
            "Refused, reset or 503 answers by replica",
            by("replica", self.upstream_errors),
        )
        family(
            "retries_total",
            "counter",
            "Requests sent again to another replica",
            [("", self.retries)],
        )
        family(
            "rejected_total",
            "counter",
            "Requests refused with a 503 while none was ready",
            by("reason", self.rejected),
        )
        family("queue_length", "gauge", "Requests waiting for a ready replica", [("", self.queued)])
        in_flight = Counter({url: r.in_flight for url, r in replicas.replicas.items()})
        family(
            "in_flight", "gauge", "This router's requests on each replica", by("replica", in_flight)
        )
        ready = Counter({url: int(r.ready) for url, r in replicas.replicas.items()})
        family("replica_ready", "gauge", "1 when the replica is ready", by("replica", ready))
        return "\n".join(lines) + "\n"


def openai_error(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, headers=headers)


class NoReplica(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Router:
    def __init__(
        self,
        replicas: ReplicaSet,
        settings: RouterSettings,
        discovery: EndpointSliceWatch | None = None,
    ) -> None:
        self.replicas, self.settings, self.discovery = replicas, settings, discovery
        self.metrics = RouterMetrics()
        self.turn = 0
        self.session: aiohttp.ClientSession | None = None

    async def pick(self, key: bytes | None, tried: set[str]) -> str:
        """A ready replica, one not yet tried for this request where there is one;
        while none is ready, the first that becomes ready."""
        loads = self.replicas.loads()
        untried = {url: load for url, load in loads.items() if url not in tried}
        if untried or loads:
            return self._decide(key, untried or loads)
        if self.metrics.queued >= self.settings.max_queue:
            raise NoReplica(
                "queue-full",
                f"no replica is ready and {self.metrics.queued} requests already wait for one",
            )
        self.metrics.queued += 1
        try:
            async with asyncio.timeout(self.settings.queue_timeout):
                async with self.replicas.changed:
                    while not (loads := self.replicas.loads()):
                        await self.replicas.changed.wait()
        except TimeoutError:
            raise NoReplica(
                "queue-timeout", f"no replica became ready within {self.settings.queue_timeout:g} s"
            ) from None
        finally:
            self.metrics.queued -= 1
        return self._decide(key, loads)

    def _decide(self, key: bytes | None, loads: dict[str, float]) -> str:
        decision = choose(self.settings.policy, key, loads, self.turn, self.settings.load_factor)
        self.turn += 1
        self.metrics.decisions[decision.reason] += 1
        return decision.replica

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parsed = None
        if request.method == "POST":
            try:
                parsed = json.loads(body)
            except ValueError as exc:
                return openai_error(400, f"The request body is not valid JSON: {exc}")
        key = prefix_key(request.path, parsed, self.settings.prefix_chars)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        tried: set[str] = set()
        for attempt in range(self.settings.retries + 1):
            try:
                url = await self.pick(key, tried)
            except NoReplica as exc:
                self.metrics.rejected[exc.reason] += 1
                return openai_error(
                    503, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
                )
            tried.add(url)
            if attempt:
                self.metrics.retries += 1
            response = await self._try(request, url, body, headers)
            if response is not None:
                return response
        return openai_error(502, f"every replica tried failed: {', '.join(sorted(tried))}")

    async def _try(
        self, request: web.Request, url: str, body: bytes, headers: dict[str, str]
    ) -> web.StreamResponse | None:
        """The replica's answer streamed to the client, or None (nothing sent yet) when
        the replica refused, reset or answered 503: the caller tries another."""
        replica = self.replicas.replicas[url]
        replica.in_flight += 1
        self.metrics.requests[url] += 1
        try:
            async with self.session.request(
                request.method, url + request.path_qs, data=body, headers=headers
            ) as upstream:
                if upstream.status == 503:
                    raise aiohttp.ClientResponseError(upstream.request_info, (), status=503)
                self.replicas.succeeded(url)
                return await self._relay(request, upstream)
        except aiohttp.ClientError:
            self.metrics.upstream_errors[url] += 1
            self.replicas.failed(url)
            return None
        finally:
            replica.in_flight -= 1

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        streaming = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            if streaming:  # bytes already reached the client: end the stream, loudly
                error = {
                    "error": {
                        "message": f"the replica's stream broke: {exc!r}",
                        "type": "server_error",
                        "param": None,
                        "code": 502,
                    }
                }
                await response.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response


def build_app(router: Router) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors(router)])

    async def health(_: web.Request) -> web.Response:
        ready = sum(r.ready for r in router.replicas.replicas.values())
        return web.json_response({"status": "ok", "ready_replicas": ready})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text=router.metrics.render(router.replicas), content_type="text/plain", charset="utf-8"
        )

    async def lifecycle(app: web.Application):
        router.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
        )
        tasks = [asyncio.create_task(router.replicas.poll_forever(router.session))]
        if router.discovery is not None:
            tasks.append(asyncio.create_task(router.discovery.run()))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await router.session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{path:.*}", router.forward)
    return app


def _errors(router: Router):
    """OpenAI-shaped errors for what the router itself refuses: a bad key (on /v1/*), a
    body over the limit."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        key = router.settings.api_key
        if key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return openai_error(401, "Incorrect API key provided.")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return openai_error(413, f"The request body is over {MAX_BODY_BYTES} bytes.")

    return middleware

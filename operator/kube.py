"""A small async Kubernetes REST client over aiohttp (kopf's own HTTP stack).

It logs in the way kopf does (in-cluster service account, else kubeconfig), with kopf's
TLS context and headers, so the operator needs no client library beside kopf. Only what
the handlers and the router's discovery use: get, create, JSON merge patch, delete,
watch. It rides out API server
trouble: 429s, 5xx and dropped connections are retried with backoff, a 401 logs in again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import kopf

from kubellm.operator.crd import GROUP, PLURAL, VERSION

# kind -> (apiVersion, plural): every kind the operator reads or writes
KINDS = {
    "Deployment": ("apps/v1", "deployments"),
    "Service": ("v1", "services"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets"),
    "Secret": ("v1", "secrets"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings"),
    "EndpointSlice": ("discovery.k8s.io/v1", "endpointslices"),
    "InferencePool": ("inference.networking.k8s.io/v1", "inferencepools"),
    "LeaderWorkerSet": ("leaderworkerset.x-k8s.io/v1", "leaderworkersets"),
    "LLMDeployment": (f"{GROUP}/{VERSION}", PLURAL),
}


def collection_path(kind: str, namespace: str) -> str:
    api_version, plural = KINDS[kind]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


def object_path(kind: str, namespace: str, name: str, subresource: str | None = None) -> str:
    path = f"{collection_path(kind, namespace)}/{name}"
    return f"{path}/{subresource}" if subresource else path


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


# Answers that say "not now": retried with backoff (Retry-After honoured, up to a cap),
# as are refused and dropped connections (an API server restarting).
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
ATTEMPTS = 8
MAX_DELAY_SECONDS = 5.0


class Kube:
    """Logged in as kopf logs in (in-cluster service account, else kubeconfig), with
    kopf's own TLS context and auth headers; a 401 (a rotated token) logs in again."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo]) -> None:
        self._login = login
        self.session: aiohttp.ClientSession | None = None
        self.server = ""
        self._auth: dict[str, str] = {}

    @classmethod
    def login(cls, settings: kopf.OperatorSettings) -> Kube:
        def login() -> kopf.ConnectionInfo:
            info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
                settings=settings
            )
            if info is None:
                raise kopf.PermanentError("no in-cluster service account and no kubeconfig")
            return info

        kube = cls(login)
        login()  # fail at start-up, not at the first request
        return kube

    async def _connect(self) -> aiohttp.ClientSession:
        if self.session is None:
            info = self._login()
            self.server = info.server.rstrip("/")
            self._auth = info.as_http_headers()
            tls = info.as_ssl_context() if self.server.startswith("https") else False
            self.session = aiohttp.ClientSession(
                headers={"Accept": "application/json"}, connector=aiohttp.TCPConnector(ssl=tls)
            )
        return self.session

    def _log_in_again(self) -> None:
        """A rotated token: read the credentials again. The session stays open, since
        the handlers' other requests share it; only the headers sent from now on change."""
        self._auth = self._login().as_http_headers()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        return await self._request("GET", path, missing_ok=True)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", path, json=body)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        return await self._request("PATCH", path, json=patch, headers=headers)

    async def delete(self, path: str) -> None:
        await self._request("DELETE", path, missing_ok=True)

    async def watch(self, path: str, params: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """The events of a watch on a collection (`params`: labelSelector,
        resourceVersion, ...), one dict each, until the server ends the stream."""
        session = await self._connect()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        query = {**params, "watch": "true"}
        async with session.get(
            self.server + path, params=query, headers=self._auth, timeout=timeout
        ) as response:
            if response.status == 401:
                self._log_in_again()  # the caller's next watch sends the new token
            if response.status >= 400:
                await _json(response)  # raises the KubeError
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def _request(self, method: str, path: str, missing_ok: bool = False, **kwargs: Any):
        """The response's JSON (None for a 404 when `missing_ok`); transient failures are
        retried, the last one raised as a KubeError."""
        relogged = False
        headers = kwargs.pop("headers", {})
        for attempt in range(ATTEMPTS):
            session = await self._connect()
            last = attempt == ATTEMPTS - 1
            url, auth = self.server + path, {**self._auth, **headers}
            try:
                async with session.request(method, url, headers=auth, **kwargs) as response:
                    if response.status == 401 and not relogged:
                        relogged = True
                        self._log_in_again()  # once per request
                        continue
                    if response.status in TRANSIENT_STATUSES and not last:
                        await asyncio.sleep(_delay(attempt, response.headers.get("Retry-After")))
                        continue
                    if response.status == 404 and missing_ok:
                        return None
                    return await _json(response)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if last:
                    raise KubeError(503, f"{method} {path}: {exc!r}") from None
                await asyncio.sleep(_delay(attempt, None))
        raise AssertionError("unreachable: the last attempt returns or raises")


def _delay(attempt: int, retry_after: str | None) -> float:
    if retry_after is not None and retry_after.isdigit():
        return min(float(retry_after), MAX_DELAY_SECONDS)
    return min(0.1 * 2**attempt, MAX_DELAY_SECONDS)


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    if response.status >= 400:
        try:
            message = (await response.json()).get("message", response.reason)
        except (aiohttp.ContentTypeError, ValueError):
            message = response.reason or ""
        raise KubeError(response.status, f"{response.method} {response.url.path}: {message}")
    return await response.json()

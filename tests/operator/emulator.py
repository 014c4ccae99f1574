"""A Kubernetes API for tests: kmock's KubernetesEmulator on 127.0.0.1, in a thread.

kmock 0.8 needs a few fixes to satisfy kopf and kubectl; they live here, and only here:
- objects get no `metadata.uid`, `resourceVersion`, `creationTimestamp` or `generation`
  (kopf's patches test `resourceVersion`; owner references need `uid`; our status
  reports `observedGeneration`): filled on create, bumped on update;
- `generateName` is ignored, so every kopf event after the first collides: honoured;
- lists lack `kind` and `apiVersion` (kubectl needs them): added;
- no server-side printing: LLMDeployment lists render the CRD's printer columns as a
  Table when kubectl asks for one;
- `GET /api/v1/namespaces` fails (kopf lists namespaces when given some to watch): served;
- the LLMDeployment resource is registered the way its CRD declares it;
- a write to the scale subresource does not bump `generation`, and a read of it returns
  the whole object instead of a Scale: both as the API server does.

And the trouble a real API server has: `refuse_claim_resize` answers a PATCH of a
PersistentVolumeClaim as it does when the claim's StorageClass does not allow expansion;
`inject(method, fragment, status, times)` answers the next matching requests with an
error status (409 conflicts, 429s with Retry-After, 500s, 401s); `Cluster.restart()`
stops listening (every open connection and watch stream cut, new ones refused for a
while) and comes back on the same port with the same objects, as a restarted API
server does.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import httpx
import kmock
import yaml
from kmock._internal import enums, rendering

from kubellm.operator.crd import PLURAL, crd

TEST_CLIENTS = ("python-httpx", "kubectl")  # user agents of the tests' own requests


@dataclass
class Fault:
    """Answer the next `left` requests `method` to a path containing `fragment` with
    `status`; `applied`: carry the request out first, so only its answer is lost."""

    method: str
    fragment: str
    status: int
    left: int
    applied: bool


class FixedEmulator(kmock.KubernetesEmulator):
    _versions = itertools.count(1)
    refuse_claim_resize = False
    faults: list[Fault]
    faults_served: int = 0

    def inject(
        self, method: str, fragment: str, status: int, times: int, applied: bool = False
    ) -> None:
        """Answer the next `times` requests `method` to a path containing `fragment`
        with `status` (an API-server-shaped Status body). `applied`: the request is
        carried out first, only its answer is lost (a create whose 201 never arrived,
        so the retry meets 409 AlreadyExists)."""
        self.faults.append(Fault(method, fragment, status, times, applied))

    def _fault(self, raw_request: aiohttp.web.BaseRequest) -> Fault | None:
        """The operator's requests only: the tests' own clients always get through."""
        if raw_request.headers.get("User-Agent", "").startswith(TEST_CLIENTS):
            return None
        for fault in self.faults:
            if (
                fault.left
                and raw_request.method == fault.method
                and (fault.fragment in raw_request.path)
            ):
                fault.left -= 1
                self.faults_served += 1
                return fault
        return None

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        fault = self._fault(raw_request)
        if fault is not None:
            if fault.applied:
                await self._answer(raw_request)
            body = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": f"injected {fault.status}",
                "code": fault.status,
            }
            headers = {"Retry-After": "1"} if fault.status == 429 else None
            return aiohttp.web.json_response(body, status=fault.status, headers=headers)
        return await self._answer(raw_request)

    async def _answer(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if (
            self.refuse_claim_resize
            and raw_request.method == "PATCH"
            and "/persistentvolumeclaims/" in raw_request.path
        ):
            return _forbidden_resize(raw_request.path.rsplit("/", 1)[-1])
        if raw_request.path == "/api/v1/namespaces":  # kmock cannot parse this path
            self._requests.append(
                rendering.Request(
                    method=raw_request.method,
                    url=raw_request.url,
                    headers=dict(raw_request.headers),
                )
            )
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest):
        """The namespaces objects live in; a watch of them stays open and quiet."""
        if raw_request.query.get("watch") in ("true", "1"):
            response = aiohttp.web.StreamResponse()
            await response.prepare(raw_request)
            await asyncio.Event().wait()  # until the client goes away
        names = sorted({ns for (_, ns, _) in list(self.objects.keys()) if ns} | {"default"})
        items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names]
        return aiohttp.web.json_response(
            {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "1"},
                "items": items,
            }
        )

    async def _handle(self, request):
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if "name" not in meta and "generateName" in meta:
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == enums.action.UPDATE and request.name is not None:
                meta["resourceVersion"] = str(next(self._versions))
                if "spec" in request.data and request.subresource in (None, "scale"):
                    current = self._current(request)
                    meta["generation"] = (current or {}).get("metadata", {}).get(
                        "generation", 0
                    ) + 1
        return await super()._handle(request)

    def _current(self, request) -> dict[str, Any] | None:
        for (resource, namespace, name), obj in list(self.objects.items()):
            if (resource, namespace, name) == (request.resource, request.namespace, request.name):
                return None if obj.deleted else obj.raw
        return None

    async def _serve_fetch(self, request):
        obj = await super()._serve_fetch(request)
        if _wants_table(request) and request.resource.plural == PLURAL:
            return printer_table([obj])
        if request.subresource == "scale" and isinstance(obj, dict):
            return _scale(obj)
        return obj

    async def _serve_list(self, request):
        payload = await super()._serve_list(request)
        if _wants_table(request) and request.resource.plural == PLURAL:
            return printer_table(payload["items"])
        info = self.resources.get(request.resource)
        kind = info.kind if info is not None and info.kind else "List"
        group_version = (
            request.resource.version
            if not request.resource.group
            else (f"{request.resource.group}/{request.resource.version}")
        )
        return {"kind": f"{kind}List", "apiVersion": group_version, **payload}


def _scale(obj: dict[str, Any]) -> dict[str, Any]:
    """The Scale object of a resource whose scale subresource maps spec.replicas,
    status.replicas and status.selector (as the LLMDeployment CRD declares)."""
    meta = obj["metadata"]
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta
        },
        "spec": {"replicas": obj.get("spec", {}).get("replicas", 0)},
        "status": {
            "replicas": obj.get("status", {}).get("replicas", 0),
            "selector": obj.get("status", {}).get("selector", ""),
        },
    }


def _forbidden_resize(name: str) -> aiohttp.web.Response:
    message = (
        f'persistentvolumeclaims "{name}" is forbidden: only dynamically provisioned pvc can '
        "be resized and the storageclass that provisions the pvc must support resize"
    )
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Forbidden",
        "code": 403,
    }
    return aiohttp.web.json_response(status, status=403)


def _wants_table(request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def printer_table(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Server-side printing, as the API server does it for a CRD's printer columns
    (what `kubectl get llmd` asks for)."""
    columns = crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0}]
    definitions += [
        {"name": c["name"], "type": c["type"], "format": "", "priority": c.get("priority", 0)}
        for c in columns
    ]
    rows = [_row(item, columns) for item in items]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": definitions,
        "rows": rows,
    }


def _row(item: dict[str, Any], columns: list[dict[str, Any]]) -> dict[str, Any]:
    cells = [item["metadata"]["name"]]
    for column in columns:
        value = _json_path(item, column["jsonPath"])
        cells.append(_age(value) if column["type"] == "date" and value else value)
    metadata = {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": item["metadata"],
    }
    return {"cells": cells, "object": metadata}


def _age(timestamp: str) -> str:
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _json_path(obj: Any, path: str) -> Any:
    """The JSONPath forms printer columns use: `.a.b` and `.a[?(@.k=="v")].b`."""
    for part in re.findall(r'\.(\w+)|\[\?\(@\.(\w+)=="([^"]*)"\)\]', path):
        field, key, value = part
        if field:
            obj = obj.get(field) if isinstance(obj, dict) else None
        else:
            obj = next((x for x in obj or [] if x.get(key) == value), None)
        if obj is None:
            return None
    return obj


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _register_llmdeployment(emulator: FixedEmulator) -> None:
    version = crd()["spec"]["versions"][0]
    names = crd()["spec"]["names"]
    key = f"{crd()['spec']['group']}/{version['name']}/{names['plural']}"
    emulator.resources[key] = kmock.ResourceInfo(
        kind=names["kind"],
        singular=names["singular"],
        namespaced=True,
        shortnames=set(names["shortNames"]),
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources=set(version["subresources"]),
    )


def register_inference_pools(emulator: FixedEmulator) -> None:
    """Serve inference.networking.k8s.io/v1 InferencePools, as a cluster with the Gateway
    API Inference Extension's CRDs installed does."""
    emulator.resources["inference.networking.k8s.io/v1/inferencepools"] = kmock.ResourceInfo(
        kind="InferencePool",
        singular="inferencepool",
        namespaced=True,
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status"},
    )


def register_leader_worker_sets(emulator: FixedEmulator) -> None:
    """Serve leaderworkerset.x-k8s.io/v1 LeaderWorkerSets, as a cluster with LWS
    installed does (its CRD declares the status and scale subresources)."""
    emulator.resources["leaderworkerset.x-k8s.io/v1/leaderworkersets"] = kmock.ResourceInfo(
        kind="LeaderWorkerSet",
        singular="leaderworkerset",
        namespaced=True,
        shortnames={"lws"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status", "scale"},
    )


def install_leader_worker_sets(cluster: Cluster) -> None:
    """What installing LWS does that the operator sees: the API is served, and its CRD
    appears (kopf watches CRDs, and then starts watching the new resource)."""
    register_leader_worker_sets(cluster.emulator)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "leaderworkersets.leaderworkerset.x-k8s.io"},
        "spec": {
            "group": "leaderworkerset.x-k8s.io",
            "names": {"kind": "LeaderWorkerSet", "plural": "leaderworkersets"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True}],
        },
    }
    cluster.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)


class Cluster:
    """The running emulator: its URL, a kubeconfig for it, and plain HTTP helpers."""

    def __init__(
        self, emulator: FixedEmulator, url: str, kubeconfig: Path, restart: Any = None
    ) -> None:
        self.emulator, self.url, self.kubeconfig = emulator, url, kubeconfig
        self.http = httpx.Client(base_url=url, timeout=10)
        self._restart = restart

    def restart(self, down_seconds: float = 2.0) -> None:
        """Stop listening (open connections cut), then listen again on the same port."""
        self._restart(down_seconds)

    def get(self, path: str) -> dict[str, Any] | None:
        response = self.http.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        response = self.http.patch(path, json=body, headers=headers)
        response.raise_for_status()
        return response.json()

    def requests(self) -> list[tuple[str, str]]:
        """(METHOD, path) of every request the emulator has served so far."""
        return [(r.method.value, r.url.path) for r in list(self.emulator._requests)]

    def operator_requests(self, since: int = 0) -> list[tuple[str, str, dict[str, str]]]:
        """(METHOD, path, query) of the requests not sent by the tests' own clients."""
        return [
            (r.method.value, r.url.path, dict(r.url.query))
            for r in list(self.emulator._requests)[since:]
            if not r.headers.get("User-Agent", "").startswith(TEST_CLIENTS)
        ]

    def versions(self, path: str) -> int:
        """How many versions of the object the emulator has stored (writes to it)."""
        parts = path.strip("/").split("/")
        namespace, plural, name = parts[-3], parts[-2], parts[-1]
        for (resource, ns, obj_name), obj in list(self.emulator.objects.items()):
            if resource.plural == plural and ns == namespace and obj_name == name:
                return len(obj.history)
        return 0


def create_llmd(cluster: Cluster, name: str, namespace: str = "ml", **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "kubellm.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return cluster.create(f"/apis/kubellm.dev/v1alpha1/namespaces/{namespace}/llmdeployments", body)


def endpoint_slice(
    name: str, service: str, port: int, namespace: str = "ml", ready: bool = True
) -> dict[str, Any]:
    """An EndpointSlice as the EndpointSlice controller writes one for a pod of `service`
    listening on 127.0.0.1:`port` (one slice per port: each test process has its own)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}],
    }


def condition(cr: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    conditions = ((cr or {}).get("status") or {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), {})


@contextmanager
def emulated_cluster(directory: Path) -> Iterator[Cluster]:
    """Serve the emulator on 127.0.0.1 from a thread of its own (its own event loop)."""
    ready = threading.Event()
    state: dict[str, Any] = {"down": 0.0}

    async def serve() -> None:
        stop, restart = asyncio.Event(), asyncio.Event()
        state.update(loop=asyncio.get_running_loop(), stop=stop, restart=restart)
        async with FixedEmulator() as emulator:
            emulator.faults = []
            emulator.resources.load_bundled()
            _register_llmdeployment(emulator)
            port = None
            while not stop.is_set():
                async with kmock.Server(emulator, host="127.0.0.1", port=port) as srv:
                    port = srv.url.port
                    state["emulator"], state["url"] = emulator, str(srv.url).rstrip("/")
                    ready.set()
                    await _first(stop.wait(), restart.wait())
                    restart.clear()
                    await _cut_connections(srv)
                await asyncio.sleep(0 if stop.is_set() else state["down"])

    def restart(down_seconds: float) -> None:
        state["down"] = down_seconds
        state["loop"].call_soon_threadsafe(state["restart"].set)

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "the emulator did not start"
    kubeconfig = directory / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(_kubeconfig(state["url"])))
    cluster = Cluster(state["emulator"], state["url"], kubeconfig, restart)
    try:
        yield cluster
    finally:
        cluster.http.close()
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(timeout=10)


async def _first(*waits) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


async def _cut_connections(server: kmock.Server) -> None:
    """Drop every open connection now (watch streams too), as a dying API server does,
    instead of waiting for aiohttp's graceful shutdown."""
    web_server = server._managed_server.runner.server  # aiohttp's low-level Server
    for connection in list(web_server.connections):
        connection.force_close()
        if connection.transport is not None:
            connection.transport.abort()


def _kubeconfig(url: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "unused"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "tester", "namespace": "default"},
            }
        ],
    }

"""A small async Kubernetes REST client over aiohttp (kopf's own HTTP stack).

It logs in the way kopf does (in-cluster service account, else kubeconfig), so the
operator needs no client library beside kopf. Only what the handlers use: get,
create, JSON merge patch, delete, and events.
"""

from __future__ import annotations

import base64
import ssl
import tempfile
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


class Kube:
    def __init__(self, info: kopf.ConnectionInfo) -> None:
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        self.server = info.server.rstrip("/")
        self.session = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(ssl=_ssl_context(info))
        )

    @classmethod
    def login(cls, settings: kopf.OperatorSettings) -> Kube:
        info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
            settings=settings
        )
        if info is None:
            raise kopf.PermanentError("no in-cluster service account and no kubeconfig")
        return cls(info)

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        async with self.session.get(self.server + path) as response:
            if response.status == 404:
                return None
            return await _json(response)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(self.server + path, json=body) as response:
            return await _json(response)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(self.server + path, json=patch, headers=headers) as response:
            return await _json(response)

    async def delete(self, path: str) -> None:
        async with self.session.delete(self.server + path) as response:
            if response.status != 404:
                await _json(response)


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    if response.status >= 400:
        try:
            message = (await response.json()).get("message", response.reason)
        except (aiohttp.ContentTypeError, ValueError):
            message = response.reason or ""
        raise KubeError(response.status, f"{response.method} {response.url.path}: {message}")
    return await response.json()


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    context = ssl.create_default_context(cafile=info.ca_path)
    if info.ca_data:
        context.load_verify_locations(cadata=_decoded(info.ca_data).decode())
    if info.certificate_path or info.certificate_data:
        cert = info.certificate_path or _to_file(_decoded(info.certificate_data))
        key = info.private_key_path or _to_file(_decoded(info.private_key_data))
        context.load_cert_chain(cert, key)
    return context


def _decoded(data: str | bytes | None) -> bytes:
    """kubeconfig's *-data fields are base64 of PEM."""
    raw = data.encode() if isinstance(data, str) else (data or b"")
    return raw if raw.startswith(b"-----") else base64.b64decode(raw)


def _to_file(pem: bytes) -> str:
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as handle:
        handle.write(pem)
        return handle.name

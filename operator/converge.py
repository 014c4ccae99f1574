"""Bring the cluster to the builders' output: create what is missing, patch what differs,
delete what should not exist. Idempotent: an object that already matches is not touched.
"""

from __future__ import annotations

from typing import Any

from kubellm.operator.kube import Kube, KubeError, collection_path, object_path
from kubellm.operator.quantity import parse_quantity

# Maps the operator owns whole: a key the spec dropped must go (set to null in the patch).
OWNED_MAPS = frozenset({"nodeSelector", "affinity"})


def matches(desired: Any, current: Any) -> bool:
    """Whether `current` already says everything `desired` says. Extra keys in `current`
    (defaults the API server added, status) do not count; lists match element-wise."""
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(
            k in current and matches(v, current[k]) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(desired) == len(current)
            and all(matches(d, c) for d, c in zip(desired, current))
        )
    return desired == current


def merge_patch(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The smallest JSON merge patch (RFC 7386) that makes `current` match `desired`.
    Lists are replaced whole; maps are merged, except owned maps lose dropped keys."""
    patch: dict[str, Any] = {}
    for key, value in desired.items():
        if key not in current:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(current[key], dict):
            sub = merge_patch(current[key], value)
            if key in OWNED_MAPS:
                sub.update({k: None for k in current[key] if k not in value})
            if sub:
                patch[key] = sub
        elif not matches(value, current[key]):
            patch[key] = value
    for key in OWNED_MAPS & current.keys() - desired.keys():
        patch[key] = None
    return patch


def claim_growth(current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    """The patch that grows a claim to the desired size; empty if it is as large already.
    A claim's other fields cannot change after creation, and it never shrinks."""
    want = desired["spec"]["resources"]["requests"]["storage"]
    have = current["spec"]["resources"]["requests"]["storage"]
    if parse_quantity(want) <= parse_quantity(have):
        return {}
    return {"spec": {"resources": {"requests": {"storage": want}}}}


async def apply(kube: Kube, desired: dict[str, Any]) -> str:
    """Create or patch one object; returns "created", "patched" or "unchanged"."""
    meta = desired["metadata"]
    path = object_path(desired["kind"], meta["namespace"], meta["name"])
    current = await kube.get(path)
    if current is None:
        try:
            await kube.create(collection_path(desired["kind"], meta["namespace"]), desired)
            return "created"
        except KubeError as exc:  # 409: created meanwhile (or our read was stale): patch it
            if exc.status != 409:
                raise
            current = await kube.get(path)
            if current is None:
                raise
    if desired["kind"] == "PersistentVolumeClaim":
        patch = claim_growth(current, desired)
    else:
        patch = merge_patch(current, desired)
    if not patch:
        return "unchanged"
    await kube.merge_patch(path, patch)
    return "patched"


async def remove(kube: Kube, kind: str, namespace: str, name: str) -> bool:
    """Delete the object if it exists; whether it did."""
    path = object_path(kind, namespace, name)
    if await kube.get(path) is None:
        return False
    await kube.delete(path)
    return True

"""The model cache PersistentVolumeClaim (hf:// sources only), mounted at HF_HOME."""

from __future__ import annotations

from typing import Any

from kubellm.operator.naming import cache_claim_name, child_metadata


def build_cache_claim(cr: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    cache = spec["cache"]
    claim: dict[str, Any] = {
        "accessModes": [cache["accessMode"]],
        "resources": {"requests": {"storage": cache["size"]}},
    }
    if cache.get("storageClassName"):
        claim["storageClassName"] = cache["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": child_metadata(cr, cache_claim_name(cr["metadata"]["name"])),
        "spec": claim,
    }

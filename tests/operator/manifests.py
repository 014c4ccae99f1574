"""Helpers for operator tests: CR bodies, the CRD's schema as JSON Schema, validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from kubellm.operator.crd import crd

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())


def custom_resource(name: str = "llama", namespace: str = "ml", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubellm.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": spec,
    }


def validate_kubernetes(obj: dict[str, Any]) -> None:
    """Strict validation against Kubernetes' own schemas, for 1.30 and the newest."""
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def _as_json_schema(schema: Any) -> Any:
    """The CRD's OpenAPI v3 dialect as JSON Schema draft 4 (nullable, int-or-string)."""
    if isinstance(schema, list):
        return [_as_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _as_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def llmd_validator() -> jsonschema.Draft4Validator:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(_as_json_schema(copy.deepcopy(schema)))


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]

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
    """Strict validation against Kubernetes' own schemas, for 1.30 and the newest; an
    InferencePool (not a built-in kind) against the v1 API as its reference documents it."""
    if obj.get("kind") == "InferencePool":
        inference_pool_validator().validate(obj)
        return
    if obj.get("kind") == "LeaderWorkerSet":
        leader_worker_set_validator().validate(obj)
        group = obj["spec"]["leaderWorkerTemplate"]
        for template in (group["leaderTemplate"], group["workerTemplate"]):
            validate_kubernetes(as_pod_template(template, obj["metadata"]))
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def as_pod_template(template: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """A PodTemplateSpec as a core/v1 PodTemplate, which Kubernetes' schemas validate."""
    meta = {"name": owner["name"], "namespace": owner["namespace"]}
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": template}


def _closed(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


_PORT = _closed({"number": {"type": "integer", "minimum": 1, "maximum": 65535}}, ["number"])
_LABEL_VALUE = {
    "type": "string",
    "maxLength": 63,
    "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
}
# inference.networking.k8s.io/v1 InferencePool, from the Gateway API Inference Extension's
# API reference (v1.0): every field it documents, nothing else allowed.
INFERENCE_POOL_V1 = _closed(
    {
        "apiVersion": {"enum": ["inference.networking.k8s.io/v1"]},
        "kind": {"enum": ["InferencePool"]},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": _closed(
            {
                "selector": _closed(
                    {"matchLabels": {"type": "object", "additionalProperties": _LABEL_VALUE}},
                    ["matchLabels"],
                ),
                "targetPorts": {"type": "array", "items": _PORT, "minItems": 1, "maxItems": 1},
                "endpointPickerRef": _closed(
                    {
                        "group": {"type": "string", "maxLength": 253},
                        "kind": {"type": "string", "maxLength": 63, "minLength": 1},
                        "name": {"type": "string", "maxLength": 253, "minLength": 1},
                        "port": _PORT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                    ["name"],
                ),
            },
            ["selector", "targetPorts", "endpointPickerRef"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)


_INT_OR_STRING = {"type": ["integer", "string"]}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_POD_TEMPLATE = {"type": "object"}  # checked whole by Kubernetes' schemas (PodTemplate)
# leaderworkerset.x-k8s.io/v1 LeaderWorkerSet, from the LWS API reference
# (site/content/en/docs/reference/leaderworkerset.v1.md) and its CRD's enums: every spec
# field it documents, nothing else allowed.
LEADER_WORKER_SET_V1 = _closed(
    {
        "apiVersion": {"enum": ["leaderworkerset.x-k8s.io/v1"]},
        "kind": {"enum": ["LeaderWorkerSet"]},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": _closed(
            {
                "replicas": _INT32 | {"minimum": 0},
                "leaderWorkerTemplate": _closed(
                    {
                        "leaderTemplate": _POD_TEMPLATE,
                        "workerTemplate": _POD_TEMPLATE,
                        "size": _INT32 | {"minimum": 1},
                        "restartPolicy": {
                            "enum": [
                                "RecreateGroupOnPodRestart",
                                "RecreateGroupAfterStart",
                                "None",
                                "Default",
                            ]
                        },
                        "subGroupPolicy": {"type": "object"},
                        "volumeClaimTemplates": {"type": "array"},
                        "persistentVolumeClaimRetentionPolicy": {"type": "object"},
                    },
                    ["workerTemplate"],
                ),
                "rolloutStrategy": _closed(
                    {
                        "type": {"enum": ["RollingUpdate"]},
                        "rollingUpdateConfiguration": _closed(
                            {
                                "partition": _INT32,
                                "maxUnavailable": _INT_OR_STRING,
                                "maxSurge": _INT_OR_STRING,
                            },
                            ["maxUnavailable", "maxSurge"],
                        ),
                    },
                    ["type"],
                ),
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "networkConfig": _closed(
                    {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}},
                    ["subdomainPolicy"],
                ),
                "groupIdentity": {"type": "string"},
            },
            ["leaderWorkerTemplate"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)


def leader_worker_set_validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(LEADER_WORKER_SET_V1)


def inference_pool_validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(INFERENCE_POOL_V1)


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

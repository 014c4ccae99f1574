"""The Deployment that runs `kubellm serve` for an LLMDeployment."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from kubellm.operator.crd import ENGINE
from kubellm.operator.naming import (
    RUNTIME_PORT,
    RUNTIME_PORT_NAME,
    TEMPLATE_HASH,
    cache_claim_name,
    child_metadata,
    labels,
    selector_labels,
)
from kubellm.operator.source import MODELS_MOUNT, SourceURI

HF_HOME = "/cache/huggingface"
PRE_STOP_SECONDS = 5  # lets Services drop the pod before SIGTERM reaches the server
# the restricted Pod Security Standard, for every container the operator runs
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
STARTUP_PERIOD_SECONDS = 10
RUNTIME_UID = 1000

# spec.engine field -> `kubellm serve` environment variable
ENGINE_ENV = {
    "maxModelLen": "KUBELLM_MAX_MODEL_LEN",
    "gpuMemoryUtilization": "KUBELLM_GPU_MEMORY_UTILIZATION",
    "blockSize": "KUBELLM_BLOCK_SIZE",
    "maxNumSeqs": "KUBELLM_MAX_NUM_SEQS",
    "maxNumBatchedTokens": "KUBELLM_MAX_NUM_BATCHED_TOKENS",
    "enablePrefixCaching": "KUBELLM_ENABLE_PREFIX_CACHING",
    "tensorParallelSize": "KUBELLM_TENSOR_PARALLEL_SIZE",
    "pipelineParallelSize": "KUBELLM_PIPELINE_PARALLEL_SIZE",
    "dtype": "KUBELLM_DTYPE",
    "quantization": "KUBELLM_QUANTIZATION",
    "toolCallParser": "KUBELLM_TOOL_CALL_PARSER",
    "shutdownTimeoutSeconds": "KUBELLM_SHUTDOWN_TIMEOUT",
}


def build_deployment(cr: dict[str, Any], spec: dict[str, Any], image: str) -> dict[str, Any]:
    """`spec` is the CR's spec with defaults applied; `image` the runtime image to use
    when the spec names none."""
    name = cr["metadata"]["name"]
    template = _pod_template(name, spec, image)
    template["metadata"]["annotations"] = {TEMPLATE_HASH: template_hash(template)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(cr),
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rollout(spec)},
            "template": template,
        },
    }


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def rollout(spec: dict[str, Any]) -> dict[str, Any]:
    """With GPUs, no surge: a rollout that needs a spare GPU deadlocks when none is free."""
    gpus = spec["resources"]["gpus"] > 0
    defaults = (
        {"maxSurge": 0, "maxUnavailable": 1} if gpus else {"maxSurge": "25%", "maxUnavailable": 0}
    )
    chosen = spec["rollout"]
    return {k: chosen.get(k) if chosen.get(k) is not None else v for k, v in defaults.items()}


def ranks_of(spec: dict[str, Any]) -> int:
    """The ranks of one replica (tensor-parallel ranks x pipeline stages): a GPU each."""
    return spec["engine"]["tensorParallelSize"] * spec["engine"]["pipelineParallelSize"]


def shm_size(spec: dict[str, Any]) -> str:
    if spec["shm"].get("sizeLimit"):
        return spec["shm"]["sizeLimit"]
    ranks = ranks_of(spec)
    return "1Gi" if ranks == 1 else f"{8 * ranks}Gi"


def _pod_template(name: str, spec: dict[str, Any], image: str) -> dict[str, Any]:
    source = SourceURI.parse(spec["model"]["source"])
    pod: dict[str, Any] = {
        "containers": [_container(name, spec, source, image)],
        "volumes": _volumes(name, spec, source),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,  # the cache PVC must be writable by the runtime
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": (
            PRE_STOP_SECONDS + spec["engine"]["shutdownTimeoutSeconds"] + 15
        ),
        "enableServiceLinks": False,
    }
    for field in ("nodeSelector", "tolerations", "affinity"):
        if spec.get(field):
            pod[field] = spec[field]
    return {"metadata": {"labels": labels(name)}, "spec": pod}


def _container(name: str, spec: dict[str, Any], source: SourceURI, image: str) -> dict[str, Any]:
    startup_budget = spec["probes"]["startupTimeoutSeconds"]
    container: dict[str, Any] = {
        "name": "runtime",
        "image": spec.get("image") or image,
        "args": list(spec["engine"]["extraArgs"]),
        "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "env": _env(name, spec, source),
        "resources": _resources(spec),
        "volumeMounts": _mounts(spec, source),
        "startupProbe": _probe(
            "/health", STARTUP_PERIOD_SECONDS, math.ceil(startup_budget / STARTUP_PERIOD_SECONDS)
        ),
        "readinessProbe": _probe("/health", 5, 3),
        # /live: 503 once the engine died or hangs; unlike /health, 200 while draining
        "livenessProbe": _probe("/live", 15, 4),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_SECONDS)]}}},
        "securityContext": CONTAINER_SECURITY_CONTEXT,
    }
    if not container["args"]:
        del container["args"]
    return container


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": RUNTIME_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _env(name: str, spec: dict[str, Any], source: SourceURI) -> list[dict[str, Any]]:
    engine = spec["engine"]
    values = {
        "KUBELLM_MODEL": source.runtime_model(),
        "KUBELLM_SERVED_MODEL_NAME": spec["model"].get("servedName") or name,
        "KUBELLM_HOST": "0.0.0.0",
        "KUBELLM_PORT": str(RUNTIME_PORT),
        "HF_HOME": HF_HOME,
    }
    if source.scheme == "hf" and spec["model"].get("revision"):
        values["KUBELLM_REVISION"] = spec["model"]["revision"]
    for field, variable in ENGINE_ENV.items():
        value = engine.get(field)
        if value is not None and value != ENGINE["properties"][field].get("default"):
            # a default is the runtime's own (tested): leave it to the runtime
            values[variable] = str(value).lower() if isinstance(value, bool) else str(value)
    env = [{"name": k, "value": v} for k, v in values.items()]
    secrets = {
        "HF_TOKEN": spec["model"].get("hfTokenSecretRef"),
        "KUBELLM_API_KEY": spec.get("apiKeySecretRef"),
    }
    for variable, ref in secrets.items():
        if ref:
            selector = {"name": ref["name"], "key": ref["key"]}
            env.append({"name": variable, "valueFrom": {"secretKeyRef": selector}})
    ours = {e["name"] for e in env}
    user = spec["env"]
    overridden = {e["name"] for e in user} & ours
    return [e for e in env if e["name"] not in overridden] + list(user)


def _resources(spec: dict[str, Any]) -> dict[str, Any]:
    wanted: dict[str, str] = {}
    resources = spec["resources"]
    if resources["gpus"] > 0:
        wanted[resources["gpuResourceName"]] = str(resources["gpus"])
    for field in ("cpu", "memory"):
        if resources.get(field):
            wanted[field] = str(resources[field])
    return {"requests": dict(wanted), "limits": dict(wanted)} if wanted else {}


def _volumes(name: str, spec: dict[str, Any], source: SourceURI) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(spec)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", **_cache_volume(name, spec)},
    ]
    if source.scheme == "pvc":
        claim = {"claimName": source.claim, "readOnly": True}
        volumes.append({"name": "model", "persistentVolumeClaim": claim})
    return volumes


def uses_cache_claim(spec: dict[str, Any]) -> bool:
    return SourceURI.parse(spec["model"]["source"]).downloads and spec["cache"]["enabled"]


def _cache_volume(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    if uses_cache_claim(spec):
        return {"persistentVolumeClaim": {"claimName": cache_claim_name(name)}}
    return {"emptyDir": {}}


def _mounts(spec: dict[str, Any], source: SourceURI) -> list[dict[str, Any]]:
    mounts = [
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": HF_HOME},
    ]
    if source.scheme == "pvc":
        path = f"{MODELS_MOUNT}/{source.claim}"
        mounts.append({"name": "model", "mountPath": path, "readOnly": True})
    return mounts

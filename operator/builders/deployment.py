"""The Deployment that runs `kubellm serve` for an LLMDeployment, and the pod templates
it and a LeaderWorkerSet (`leader_worker_set.py`) are made of."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from kubellm.operator.crd import ENGINE, GROUP
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
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"  # set by LWS on its pods
LWS_GROUP_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
PRE_STOP_SECONDS = 5  # lets Services drop the pod before SIGTERM reaches the server
# the restricted Pod Security Standard, for every container the operator runs
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
STARTUP_PERIOD_SECONDS = 10
RUNTIME_UID = 1000


@dataclass(frozen=True)
class PodRole:
    """What a pod of a replica does: `args` start its part of `kubellm serve`; `serves`:
    it runs the API (port, probes); `in_group`: one of a LeaderWorkerSet group's pods."""

    name: str
    args: tuple[str, ...] = ()
    serves: bool = True
    in_group: bool = False


# The nodes of a group meet as vLLM's do on a LeaderWorkerSet: the variables LWS sets in
# every pod of a group give the node count, this pod's index and node 0's address.
_GROUP = ("--nnodes", "$(LWS_GROUP_SIZE)", "--master-addr", "$(LWS_LEADER_ADDRESS)")
SINGLE_POD = PodRole("single")
LEADER = PodRole("leader", (*_GROUP, "--node-rank", "0"), in_group=True)
# no API, no probes: a worker exits (and LWS recreates the group) when it loses its leader
# or a rank, and a hung worker stalls the leader, whose /live then fails
WORKER = PodRole(
    "worker", (*_GROUP, "--node-rank", "$(LWS_WORKER_INDEX)", "--headless"), False, True
)
ROLE_LABEL = f"{GROUP}/role"  # leader or worker, on the pods of a group
# the pods of one group preferably on different nodes (each takes a node's GPUs anyway)
GROUP_SPREAD = {
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {
                        "matchExpressions": [{"key": ROLE_LABEL, "operator": "Exists"}]
                    },
                    # narrowed to the pod's own group (Kubernetes 1.31+; before: any group's)
                    "matchLabelKeys": [LWS_NAME_LABEL, LWS_GROUP_LABEL],
                    "topologyKey": "kubernetes.io/hostname",
                },
            }
        ]
    }
}

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
    template = pod_template(name, spec, image)
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


def pods_per_replica(spec: dict[str, Any]) -> int:
    """One pod, unless a replica's ranks outnumber the GPUs of a pod: then as many pods
    (of resources.gpus ranks each) as its ranks need, a LeaderWorkerSet group."""
    ranks, gpus = ranks_of(spec), spec["resources"]["gpus"]
    return ranks // gpus if gpus and ranks > gpus else 1


def workload_kind(spec: dict[str, Any]) -> str:
    """The child that runs the replicas (named as the LLMDeployment)."""
    return "LeaderWorkerSet" if pods_per_replica(spec) > 1 else "Deployment"


def serving_labels(name: str, spec: dict[str, Any]) -> dict[str, str]:
    """The pods that serve the API: every replica pod, or each group's leader."""
    leaders = {ROLE_LABEL: LEADER.name} if pods_per_replica(spec) > 1 else {}
    return selector_labels(name) | leaders


def shm_size(spec: dict[str, Any]) -> str:
    if spec["shm"].get("sizeLimit"):
        return spec["shm"]["sizeLimit"]
    ranks = ranks_of(spec) // pods_per_replica(spec)  # this pod's
    return "1Gi" if ranks == 1 else f"{8 * ranks}Gi"


def pod_template(
    name: str, spec: dict[str, Any], image: str, role: PodRole = SINGLE_POD
) -> dict[str, Any]:
    """A pod of the replica: all of it (the Deployment's), or in a LeaderWorkerSet group
    its leader (node 0, the API) or one of its workers (a headless node)."""
    source = SourceURI.parse(spec["model"]["source"])
    pod: dict[str, Any] = {
        "containers": [_container(name, spec, source, image, role)],
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
    if role.in_group and not spec.get("affinity"):
        pod["affinity"] = GROUP_SPREAD
    pod_labels = labels(name) | ({ROLE_LABEL: role.name} if role.in_group else {})
    return {"metadata": {"labels": pod_labels}, "spec": pod}


def _container(
    name: str, spec: dict[str, Any], source: SourceURI, image: str, role: PodRole
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "runtime",
        "image": spec.get("image") or image,
        "args": [*role.args, *spec["engine"]["extraArgs"]],
        "env": _env(name, spec, source),
        "resources": _resources(spec),
        "volumeMounts": _mounts(spec, source),
        "securityContext": CONTAINER_SECURITY_CONTEXT,
    }
    if not container["args"]:
        del container["args"]
    if role.serves:
        container |= _serving(spec)
    return container


def _serving(spec: dict[str, Any]) -> dict[str, Any]:
    """What the pod that serves the API has: its port, probes, and a pause before SIGTERM."""
    startup_budget = spec["probes"]["startupTimeoutSeconds"]
    return {
        "ports": [{"name": RUNTIME_PORT_NAME, "containerPort": RUNTIME_PORT, "protocol": "TCP"}],
        "startupProbe": _probe(
            "/health", STARTUP_PERIOD_SECONDS, math.ceil(startup_budget / STARTUP_PERIOD_SECONDS)
        ),
        "readinessProbe": _probe("/health", 5, 3),
        # /live: 503 once the engine died or hangs; unlike /health, 200 while draining
        "livenessProbe": _probe("/live", 15, 4),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_SECONDS)]}}},
    }


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

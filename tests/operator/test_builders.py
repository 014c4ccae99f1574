"""The pure builders: every child validates against Kubernetes' schemas, and has the
shape users rely on (GPU-safe rollouts, probes, shm, cache, secrets, security)."""

from __future__ import annotations

import pytest

from kubellm.operator.builders import build_children
from kubellm.operator.naming import TEMPLATE_HASH
from tests.operator.manifests import custom_resource, validate_kubernetes

IMAGE = "registry.example/kubellm-runtime:1"
ROUTER_IMAGE = "registry.example/kubellm-operator:1"

VARIANTS = {
    "builtin-cpu": {"resources": {"gpus": 0}},
    "hf-gpu-secrets": {
        "model": {
            "source": "hf://meta-llama/Llama-3.1-8B-Instruct",
            "revision": "main",
            "hfTokenSecretRef": {"name": "hf", "key": "token"},
        },
        "apiKeySecretRef": {"name": "api", "key": "key"},
        "cache": {"size": "100Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"},
        "resources": {"gpus": 1, "cpu": "8", "memory": "64Gi"},
        "replicas": 3,
    },
    "hf-tp2": {
        "model": {
            "source": "hf://meta-llama/Llama-2-13b-chat-hf",
            "hfTokenSecretRef": {"name": "hf", "key": "token"},
        },
        "engine": {"tensorParallelSize": 2},
        "resources": {"gpus": 2, "memory": "64Gi"},
    },
    "pvc-tp4": {
        "model": {"source": "pvc://models/llama-70b"},
        "engine": {"tensorParallelSize": 4, "maxModelLen": 8192, "extraArgs": ["--x", "1"]},
        "resources": {"gpus": 4},
        "rollout": {"maxSurge": 1, "maxUnavailable": "50%"},
        "env": [{"name": "KUBELLM_MAX_NUM_SEQS", "value": "64"}, {"name": "EXTRA", "value": "1"}],
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        "service": {"type": "LoadBalancer", "port": 8080},
        "replicas": 0,
    },
}


def _children(**spec):
    """The children by kind, the router's left out (`routing` has tests of its own)."""
    desired = build_children(custom_resource(**spec), IMAGE, ROUTER_IMAGE).desired
    routers = {"llama-router", "llama-replicas"}
    return {o["kind"]: o for o in desired if o["metadata"]["name"] not in routers}


def _container(children):
    return children["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def _env(children) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(children)["env"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_child_validates_against_kubernetes_schemas(variant):
    result = build_children(custom_resource(**VARIANTS[variant]), IMAGE, ROUTER_IMAGE)
    assert result.desired
    for obj in result.desired:
        validate_kubernetes(obj)


def test_children_are_named_labelled_and_owned_by_the_resource():
    for obj in _children().values():
        meta = obj["metadata"]
        assert meta["namespace"] == "ml" and meta["labels"]["app.kubernetes.io/instance"] == "llama"
        (owner,) = meta["ownerReferences"]
        assert owner["kind"] == "LLMDeployment" and owner["uid"] == "uid-llama"
        assert owner["controller"] is True


def test_which_children_exist_depends_on_source_and_replicas():
    assert set(_children()) == {"Deployment", "Service"}  # builtin: no cache PVC
    hf = _children(model={"source": "hf://org/m"}, replicas=2)
    assert set(hf) == {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget"}
    assert "PersistentVolumeClaim" not in _children(model={"source": "pvc://c/p"})
    no_cache = _children(model={"source": "hf://org/m"}, cache={"enabled": False})
    assert "PersistentVolumeClaim" not in no_cache
    one = build_children(custom_resource(replicas=1), IMAGE, ROUTER_IMAGE)
    assert one.absent == [
        ("LeaderWorkerSet", "llama"),
        ("InferencePool", "llama"),
        ("PodDisruptionBudget", "llama"),
    ]


def test_gpu_pods_roll_without_surge_and_cpu_pods_without_unavailability():
    gpu = _children(resources={"gpus": 1})["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    cpu = _children(resources={"gpus": 0})["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert gpu == {"maxSurge": 0, "maxUnavailable": 1}
    assert cpu == {"maxSurge": "25%", "maxUnavailable": 0}
    chosen = _children(rollout={"maxSurge": 1})["Deployment"]["spec"]["strategy"]
    assert chosen["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 1}


def test_gpus_become_limits_and_cpu_pods_ask_for_none():
    gpu = _container(_children(resources={"gpus": 2, "memory": "32Gi"}))["resources"]
    assert gpu["limits"] == {"nvidia.com/gpu": "2", "memory": "32Gi"} == gpu["requests"]
    assert _container(_children(resources={"gpus": 0}))["resources"] == {}


def test_engine_settings_and_model_become_kubellm_environment():
    env = _env(_children(**VARIANTS["hf-gpu-secrets"]))
    assert env["KUBELLM_MODEL"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert env["KUBELLM_REVISION"] == "main" and env["KUBELLM_SERVED_MODEL_NAME"] == "llama"
    assert env["KUBELLM_PORT"] == "8000"
    assert "KUBELLM_ENABLE_PREFIX_CACHING" not in env  # the default: the runtime's own
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["KUBELLM_API_KEY"] == {"secretKeyRef": {"name": "api", "key": "key"}}
    pvc = _children(**VARIANTS["pvc-tp4"])
    env = _env(pvc)
    assert env["KUBELLM_MODEL"] == "/models/models/llama-70b"
    assert env["KUBELLM_MAX_NUM_SEQS"] == "64" and env["EXTRA"] == "1"  # the user's env wins
    assert [e["name"] for e in _container(pvc)["env"]].count("KUBELLM_MAX_NUM_SEQS") == 1
    assert _container(pvc)["args"] == ["--x", "1"]


def test_a_pipeline_of_stages_runs_in_one_pod_with_a_gpu_per_rank():
    staged = _children(
        engine={"tensorParallelSize": 2, "pipelineParallelSize": 2}, resources={"gpus": 4}
    )
    env = _env(staged)
    assert env["KUBELLM_TENSOR_PARALLEL_SIZE"] == "2"
    assert env["KUBELLM_PIPELINE_PARALLEL_SIZE"] == "2"
    assert _container(staged)["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_a_pvc_model_is_mounted_read_only():
    children = _children(model={"source": "pvc://models/llama-70b"})
    volumes = {v["name"]: v for v in children["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    mounts = {m["name"]: m for m in _container(children)["volumeMounts"]}
    assert mounts["model"] == {"name": "model", "mountPath": "/models/models", "readOnly": True}


def test_hf_models_cache_on_the_claim_mounted_at_hf_home():
    children = _children(model={"source": "hf://org/m"}, cache={"size": "10Gi"})
    claim = children["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "llama-model-cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    volumes = {v["name"]: v for v in children["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "llama-model-cache"
    assert _env(children)["HF_HOME"] == "/cache/huggingface"


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        ({}, "1Gi"),
        ({"engine": {"tensorParallelSize": 2}, "resources": {"gpus": 2}}, "16Gi"),
        ({"engine": {"tensorParallelSize": 4}, "resources": {"gpus": 4}}, "32Gi"),
        (
            {
                "engine": {"tensorParallelSize": 2, "pipelineParallelSize": 2},
                "resources": {"gpus": 4},
            },
            "32Gi",
        ),
        ({"shm": {"sizeLimit": "3Gi"}}, "3Gi"),
    ],
)
def test_shm_is_a_sized_memory_volume(spec, size):
    volumes = _children(**spec)["Deployment"]["spec"]["template"]["spec"]["volumes"]
    shm = next(v for v in volumes if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": size}


def test_probes_give_a_long_load_its_budget_and_drain_its_time():
    children = _children(
        probes={"startupTimeoutSeconds": 3600}, engine={"shutdownTimeoutSeconds": 60}
    )
    container = _container(children)
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"  # /health: 503 while draining
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 60 + 5  # drain plus preStop
    assert _env(children)["KUBELLM_SHUTDOWN_TIMEOUT"] == "60"


def test_pods_are_restricted():
    children = _children()
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container(children)["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}


def test_replicas_do_not_change_the_pod_template_and_engine_settings_do():
    def template_of(**spec):
        return _children(**spec)["Deployment"]["spec"]["template"]

    one = template_of(replicas=1)
    assert template_of(replicas=5) == one
    changed = template_of(replicas=1, engine={"maxNumSeqs": 8})
    assert (
        changed["metadata"]["annotations"][TEMPLATE_HASH]
        != (one["metadata"]["annotations"][TEMPLATE_HASH])
    )


def test_service_maps_its_port_to_the_runtime():
    service = _children(service={"port": 8080}, routing={"policy": "none"})["Service"]
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert (
        service["spec"]["selector"]
        == (_children(routing={"policy": "none"})["Deployment"]["spec"]["selector"]["matchLabels"])
    )

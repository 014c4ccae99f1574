"""A replica whose ranks outnumber a pod's GPUs runs as a LeaderWorkerSet group: checked
against the leaderworkerset.x-k8s.io/v1 API's fields and Kubernetes' pod schemas, its
command lines read back by `kubellm serve`'s own parser, and only leaders serving."""

from __future__ import annotations

import copy

import pytest

from kubellm.operator.builders import build_children
from kubellm.operator.builders.deployment import ROLE_LABEL
from kubellm.runtime.engine_flags import engine_config
from kubellm.runtime.serve import check_headless, parse_args
from tests.operator.manifests import (
    ROOT,
    custom_resource,
    leader_worker_set_validator,
    load_yaml_documents,
    validate_kubernetes,
)

IMAGE = "registry.example/kubellm-runtime:1"
ROUTER_IMAGE = "registry.example/kubellm-operator:1"
EXAMPLE = ROOT / "examples" / "gpu-multinode-405b.yaml"
# what LeaderWorkerSet sets in each pod of group 0 of `llama-405b` in namespace ml
LWS_ENV = {"LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "llama-405b-0.llama-405b.ml"}


def _example(**changes) -> dict:
    (cr,) = load_yaml_documents(EXAMPLE)
    cr["metadata"] |= {"namespace": "ml", "uid": "uid-405b"}
    cr["spec"] |= changes
    return cr


def _built(cr: dict) -> dict:
    children = build_children(cr, IMAGE, ROUTER_IMAGE)
    return {(c["kind"], c["metadata"]["name"]): c for c in children.desired}


def _group(cr: dict) -> dict:
    return _built(cr)[("LeaderWorkerSet", "llama-405b")]["spec"]["leaderWorkerTemplate"]


def _serve_args(template: dict, worker_index: str) -> tuple:
    """`kubellm serve`'s parsed flags for the pod's container, after the kubelet expands
    $(VAR) from LWS's variables."""
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    variables = {**LWS_ENV, "LWS_WORKER_INDEX": worker_index}
    argv = [_expand(a, variables) for a in container["args"]]
    return parse_args(argv, env)


def _expand(arg: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        arg = arg.replace(f"$({name})", value)
    assert "$(" not in arg, arg
    return arg


def test_tp8_pp2_on_8_gpu_pods_is_one_lws_group_of_two_pods_per_replica():
    built = _built(_example(replicas=3))
    assert ("Deployment", "llama-405b") not in built
    lws = built[("LeaderWorkerSet", "llama-405b")]
    validate_kubernetes(lws)  # the LWS v1 fields, and both pod templates as PodTemplates
    assert lws["spec"]["replicas"] == 3
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"
    rolling = lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}  # no spare GPUs needed
    for role in ("leaderTemplate", "workerTemplate"):
        pod = group[role]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "llama-405b-model-cache"
        assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        spread = pod["affinity"]["podAntiAffinity"]
        term = spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert "leaderworkerset.sigs.k8s.io/group-index" in term["matchLabelKeys"]


def test_the_pods_command_lines_are_what_kubellm_serve_accepts_for_each_node():
    group = _group(_example())
    leader = _serve_args(group["leaderTemplate"], "0")
    assert (leader.nnodes, leader.node_rank, leader.headless) == (2, 0, False)
    assert leader.master_addr == LWS_ENV["LWS_LEADER_ADDRESS"]
    assert (leader.tensor_parallel_size, leader.pipeline_parallel_size) == (8, 2)
    worker = _serve_args(group["workerTemplate"], "1")
    assert (worker.nnodes, worker.node_rank, worker.headless) == (2, 1, True)
    assert worker.master_addr == LWS_ENV["LWS_LEADER_ADDRESS"]
    for args in (leader, worker):
        config = engine_config(args)  # the settings check out: 16 ranks, 8 on each node
        assert config.ranks_per_node == 8
        check_headless(args.headless, config.node_rank)
    leader_settings, worker_settings = vars(leader), vars(worker)
    for node_local in ("node_rank", "headless"):
        del leader_settings[node_local], worker_settings[node_local]
    assert leader_settings == worker_settings  # node 1 would be refused otherwise


def test_only_the_leader_serves_probes_and_the_services_select_it():
    built = _built(_example(routing={"policy": "none"}))
    group = built[("LeaderWorkerSet", "llama-405b")]["spec"]["leaderWorkerTemplate"]
    (leader,) = group["leaderTemplate"]["spec"]["containers"]
    (worker,) = group["workerTemplate"]["spec"]["containers"]
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health"
    assert leader["livenessProbe"]["httpGet"]["path"] == "/live"
    assert leader["ports"][0]["containerPort"] == 8000
    for serving in ("ports", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle"):
        assert serving not in worker  # a headless node serves no API
    selector = built[("Service", "llama-405b")]["spec"]["selector"]
    leader_labels = group["leaderTemplate"]["metadata"]["labels"]
    worker_labels = group["workerTemplate"]["metadata"]["labels"]
    assert selector.items() <= leader_labels.items()
    assert not selector.items() <= worker_labels.items()
    routed = _built(_example(routing={"policy": "prefix", "inferencePool": True}))
    for kind, name in (("Service", "llama-405b-replicas"), ("InferencePool", "llama-405b")):
        obj = routed[(kind, name)]["spec"]["selector"]
        chosen = obj.get("matchLabels", obj)
        assert chosen[ROLE_LABEL] == "leader" and chosen.items() <= leader_labels.items()


def test_the_users_affinity_replaces_the_groups_spread():
    mine = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                ]
            }
        }
    }
    group = _group(_example(affinity=mine))
    for role in ("leaderTemplate", "workerTemplate"):
        assert group[role]["spec"]["affinity"] == mine


def test_single_pod_resources_keep_their_deployment():
    cr = custom_resource(engine={"tensorParallelSize": 8}, resources={"gpus": 8})
    built = _built(cr)
    assert ("LeaderWorkerSet", "llama") not in built
    template = built[("Deployment", "llama")]["spec"]["template"]
    assert ROLE_LABEL not in template["metadata"]["labels"]
    assert "affinity" not in template["spec"] and "args" not in template["spec"]["containers"][0]
    assert ("LeaderWorkerSet", "llama") in build_children(cr, IMAGE, ROUTER_IMAGE).absent


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "leaderWorkerTemplate", "restartPolicy"), "Always"),
        (("spec", "leaderWorkerTemplate", "groupSize"), 2),
        (("spec", "startupPolicy"), "WorkersFirst"),
        (("spec", "rolloutStrategy", "type"), "Recreate"),
    ],
)
def test_the_lws_schema_refuses_what_v1_does_not_have(path, value):
    lws = copy.deepcopy(_built(_example())[("LeaderWorkerSet", "llama-405b")])
    target = lws
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert list(leader_worker_set_validator().iter_errors(lws))

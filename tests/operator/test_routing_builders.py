"""What `spec.routing` builds: a router in front of the replicas (its Deployment, the
Services that lead to it and to the replicas, RBAC for exactly its discovery), today's
objects for `none`, and an InferencePool checked against the v1 API's fields."""

from __future__ import annotations

import jsonschema
import pytest

from kubellm.operator.builders import build_children
from kubellm.operator.crd import ROUTING_POLICIES
from tests.operator.manifests import custom_resource, inference_pool_validator, validate_kubernetes

IMAGE, ROUTER_IMAGE = "registry.example/kubellm-runtime:1", "registry.example/kubellm-operator:1"


def _built(**spec):
    children = build_children(custom_resource(**spec), IMAGE, ROUTER_IMAGE)
    return {(o["kind"], o["metadata"]["name"]): o for o in children.desired}, children.absent


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("policy", ROUTING_POLICIES)
@pytest.mark.parametrize("replicas", [1, 3])
def test_every_child_of_every_policy_validates(policy, replicas):
    built, _ = _built(routing={"policy": policy, "inferencePool": True}, replicas=replicas)
    for obj in built.values():
        validate_kubernetes(obj)


def test_a_routed_deployment_puts_the_router_between_its_service_and_its_replicas():
    built, absent = _built(replicas=3, service={"port": 8080})
    assert set(built) == {
        ("Deployment", "llama"),
        ("Deployment", "llama-router"),
        ("Service", "llama"),
        ("Service", "llama-replicas"),
        ("ServiceAccount", "llama-router"),
        ("Role", "llama-router"),
        ("RoleBinding", "llama-router"),
        ("PodDisruptionBudget", "llama"),
    }
    assert absent == [("LeaderWorkerSet", "llama"), ("InferencePool", "llama")]
    runtime_pods = built[("Deployment", "llama")]["spec"]["template"]["metadata"]["labels"]
    router = built[("Deployment", "llama-router")]
    router_pods = router["spec"]["template"]["metadata"]["labels"]
    endpoint, headless = built[("Service", "llama")], built[("Service", "llama-replicas")]
    assert _matches(endpoint["spec"]["selector"], router_pods)
    assert not _matches(endpoint["spec"]["selector"], runtime_pods)
    assert _matches(headless["spec"]["selector"], runtime_pods)
    assert not _matches(headless["spec"]["selector"], router_pods)
    runtime_selector = built[("Deployment", "llama")]["spec"]["selector"]["matchLabels"]
    assert not _matches(runtime_selector, router_pods)  # the replicas never adopt a router
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][0]["port"] == 8000
    assert endpoint["spec"]["ports"][0] == {
        "name": "http",
        "port": 8080,
        "targetPort": "http",
        "protocol": "TCP",
    }
    assert router["spec"]["replicas"] == 2
    pod = router["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "llama-router"
    (container,) = pod["containers"]
    assert container["image"] == ROUTER_IMAGE and "nvidia.com/gpu" not in str(container)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"


def test_one_replica_gets_one_router_and_the_spec_may_name_its_image():
    built, _ = _built(replicas=1, routing={"image": "mine/router:2"})
    router = built[("Deployment", "llama-router")]
    assert router["spec"]["replicas"] == 1
    assert router["spec"]["template"]["spec"]["containers"][0]["image"] == "mine/router:2"


def test_the_routers_role_allows_exactly_listing_and_watching_endpoint_slices():
    built, _ = _built()
    role, binding = built[("Role", "llama-router")], built[("RoleBinding", "llama-router")]
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list", "watch"],
        }
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "llama-router",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "llama-router", "namespace": "ml"}
    ]


def test_policy_none_gives_exactly_the_objects_of_before_and_removes_the_routers():
    built, absent = _built(routing={"policy": "none"})
    assert set(built) == {("Deployment", "llama"), ("Service", "llama")}
    pods = built[("Deployment", "llama")]["spec"]["template"]["metadata"]["labels"]
    assert _matches(built[("Service", "llama")]["spec"]["selector"], pods)
    assert set(absent) >= {
        ("Service", "llama-replicas"),
        ("Deployment", "llama-router"),
        ("Role", "llama-router"),
        ("RoleBinding", "llama-router"),
        ("ServiceAccount", "llama-router"),
    }


def test_the_inference_pool_selects_the_replicas_on_8000_through_the_users_picker():
    built, _ = _built(routing={"inferencePool": True})
    pool = built[("InferencePool", "llama")]
    pods = built[("Deployment", "llama")]["spec"]["template"]["metadata"]["labels"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert _matches(pool["spec"]["selector"]["matchLabels"], pods)
    router_pods = built[("Deployment", "llama-router")]["spec"]["template"]["metadata"]["labels"]
    assert not _matches(pool["spec"]["selector"]["matchLabels"], router_pods)
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service",
        "name": "llama-epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    picker = {"name": "shared-epp", "port": 9003, "failureMode": "FailOpen"}
    chosen, _ = _built(routing={"inferencePool": True, "endpointPicker": picker})
    ref = chosen[("InferencePool", "llama")]["spec"]["endpointPickerRef"]
    assert (ref["name"], ref["port"], ref["failureMode"]) == (
        "shared-epp",
        {"number": 9003},
        "FailOpen",
    )


@pytest.mark.parametrize(
    "broken",
    [
        {"targetPortNumber": 8000},  # v1alpha2's field name
        {"targetPorts": [{"number": 8000}, {"number": 8001}]},  # at most one port
        {"extensionRef": {"name": "epp"}},  # v1alpha2's picker reference
    ],
)
def test_the_pool_schema_refuses_what_v1_does_not_have(broken):
    built, _ = _built(routing={"inferencePool": True})
    pool = built[("InferencePool", "llama")]
    pool["spec"].update(broken)
    with pytest.raises(jsonschema.ValidationError):
        inference_pool_validator().validate(pool)

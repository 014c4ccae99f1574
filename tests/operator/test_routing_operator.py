"""The operator's router and InferencePool, run by kopf against the emulated cluster."""

from __future__ import annotations

from typing import Any

from kubellm.operator.kube import object_path
from tests.helpers import wait_for
from tests.operator.emulator import (
    Cluster,
    condition,
    create_llmd,
    register_inference_pools,
)
from tests.operator.manifests import validate_kubernetes
from tests.operator.operated import NS, child, mark_ready, operator

ROUTER_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Deployment")


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (cluster.get(object_path("LLMDeployment", NS, name)) or {}).get("status") or {}


def _ready(cluster: Cluster, name: str) -> dict[str, Any]:
    return condition({"status": _status(cluster, name)}, "Ready")


def test_a_routed_resource_gets_its_router_and_drops_it_for_policy_none(cluster, monkeypatch):
    name = "fleet"
    router = f"{name}-router"
    with operator(cluster, monkeypatch) as runner:
        create_llmd(cluster, name, model={"source": "hf://org/fleet"}, replicas=3)
        objects = {
            kind: wait_for(lambda k=kind: child(cluster, k, router), message=kind)
            for kind in ROUTER_KINDS
        }
        headless = wait_for(lambda: child(cluster, "Service", f"{name}-replicas"))
        service = wait_for(lambda: child(cluster, "Service", name))
        for obj in [*objects.values(), headless, service]:
            validate_kubernetes(obj)
        routers = objects["Deployment"]["spec"]
        assert routers["replicas"] == 2  # a router per zone of failure, not per replica
        assert routers["template"]["spec"]["serviceAccountName"] == router
        env = {
            e["name"]: e.get("value") for e in routers["template"]["spec"]["containers"][0]["env"]
        }
        assert env["KUBELLM_DISCOVER"] == f"{name}-replicas.{NS}"
        assert env["KUBELLM_POLICY"] == "prefix"
        assert headless["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == routers["selector"]["matchLabels"]
        replicas = child(cluster, "Deployment", name)["spec"]["selector"]["matchLabels"]
        assert headless["spec"]["selector"] == replicas

        # the replicas ready but no router yet: the endpoint cannot answer
        ready = {"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}
        cluster.patch(object_path("Deployment", NS, name) + "/status", {"status": ready})
        wait_for(lambda: _ready(cluster, name).get("reason") == "RouterNotReady")
        mark_ready(cluster, name)
        wait_for(lambda: _ready(cluster, name).get("status") == "True", message="Ready")
        assert _status(cluster, name)["router"] == {
            "policy": "prefix",
            "replicas": 2,
            "readyReplicas": 2,
        }

        path = object_path("LLMDeployment", NS, name)
        cluster.patch(path, {"spec": {"routing": {"policy": "none"}}})
        for kind in ROUTER_KINDS:
            wait_for(lambda k=kind: child(cluster, k, router) is None, message=f"{kind} gone")
        wait_for(lambda: child(cluster, "Service", f"{name}-replicas") is None)
        assert child(cluster, "Service", name)["spec"]["selector"] == replicas
        wait_for(lambda: "router" not in _status(cluster, name), message="status.router gone")
    assert f"Deployment {router} deleted" in runner.output


def test_an_inference_pool_waits_for_its_api_and_the_rest_serves_meanwhile(cluster, monkeypatch):
    name = "pooled"
    path = object_path("LLMDeployment", NS, name)
    pool_path = f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools/{name}"
    with operator(cluster, monkeypatch):
        create_llmd(
            cluster,
            name,
            model={"source": "hf://org/pooled"},
            replicas=2,
            routing={"inferencePool": True, "endpointPicker": {"failureMode": "FailOpen"}},
        )
        mark_ready(cluster, name)  # everything but the pool converged
        degraded = wait_for(
            lambda: (
                condition(c := cluster.get(path), "Degraded").get("reason")
                == "InferencePoolAPIMissing"
                and condition(c, "Ready")["status"] == "True"
                and c
            ),
            message="Ready, and Degraded for the missing pool API",
        )
        assert "gateway-api-inference-extension" in condition(degraded, "Degraded")["message"]
        register_inference_pools(cluster.emulator)  # the CRDs installed: no edit needed
        pool = wait_for(lambda: cluster.get(pool_path), message="the InferencePool")
        validate_kubernetes(pool)
        replicas = child(cluster, "Deployment", name)["spec"]["selector"]["matchLabels"]
        assert pool["spec"]["selector"] == {"matchLabels": replicas}
        assert pool["spec"]["endpointPickerRef"]["name"] == f"{name}-epp"
        assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
        wait_for(
            lambda: condition(cluster.get(path), "Degraded").get("status") == "False",
            message="Degraded cleared",
        )
        cluster.patch(path, {"spec": {"routing": {"inferencePool": False}}})
        wait_for(lambda: cluster.get(pool_path) is None, message="the pool removed")

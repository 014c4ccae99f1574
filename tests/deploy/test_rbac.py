"""The chart's RBAC grants exactly what the operator uses: the permissions are derived from
every request the operator sends while it runs a scenario that exercises each of its
code paths (kopf against kmock's emulator), never listed by hand."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from kubellm.operator.builders.router import DISCOVERY_RULES
from kubellm.operator.kube import collection_path, object_path
from tests.deploy.chart import render
from tests.deploy.rbac import granted, permission_of
from tests.helpers import wait_for
from tests.operator.emulator import (
    Cluster,
    condition,
    create_llmd,
    emulated_cluster,
    install_leader_worker_sets,
    register_inference_pools,
)

NS = "ml"
ROUTER_KINDS = ("ServiceAccount", "Role", "RoleBinding", "Deployment")


def _scenario(cluster: Cluster) -> None:
    """Every write and read the operator has: create, patch back drift, delete, status,
    events, Secrets, claims (created, looked up, grown)."""
    for name, key in (("hf", "token"), ("api", "key")):
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": NS},
            "data": {key: "eHl6"},
        }
        cluster.create(collection_path("Secret", NS), secret)
    model = {"source": "hf://org/m", "hfTokenSecretRef": {"name": "hf", "key": "token"}}
    api_key = {"name": "api", "key": "key"}
    create_llmd(cluster, "full", replicas=2, apiKeySecretRef=api_key, model=model)
    path = object_path("LLMDeployment", NS, "full")
    pdb = object_path("PodDisruptionBudget", NS, "full")
    wait_for(lambda: cluster.get(pdb), message="the PDB")
    cluster.patch(pdb, {"spec": {"maxUnavailable": 2}})  # drift the operator must patch back
    cluster.patch(path, {"spec": {"service": {"port": 8080}}})
    wait_for(lambda: cluster.get(pdb)["spec"]["maxUnavailable"] == 1, message="PDB restored")
    service = object_path("Service", NS, "full")
    wait_for(lambda: cluster.get(service)["spec"]["ports"][0]["port"] == 8080)
    cluster.patch(path, {"spec": {"replicas": 1, "cache": {"size": "80Gi"}}})
    wait_for(lambda: cluster.get(pdb) is None, message="the PDB deleted")
    claim = object_path("PersistentVolumeClaim", NS, "full-model-cache")
    wait_for(lambda: cluster.get(claim)["spec"]["resources"]["requests"]["storage"] == "80Gi")
    deployment = object_path("Deployment", NS, "full")
    cluster.patch(
        deployment + "/status",
        {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}},
    )
    cluster.patch(
        deployment.replace("/full", "/full-router") + "/status",
        {"status": {"replicas": 1, "readyReplicas": 1}},
    )
    wait_for(lambda: condition(cluster.get(path), "Ready").get("status") == "True")
    _route_and_pool(cluster, path)
    _autoscale(cluster)
    _multi_pod(cluster)
    create_llmd(cluster, "claimed", model={"source": "pvc://missing/model"})
    claimed = object_path("LLMDeployment", NS, "claimed")
    wait_for(lambda: condition(cluster.get(claimed), "Degraded").get("reason") == "ClaimNotFound")
    wait_for(lambda: len(cluster.get(f"/api/v1/namespaces/{NS}/events")["items"]) >= 2)


def _route_and_pool(cluster: Cluster, path: str) -> None:
    """The router's objects drifted and restored at the next reconcile, an InferencePool
    waiting for its API, created once it is served, patched after an edit, then all of
    them deleted."""
    router = {kind: object_path(kind, NS, "full-router") for kind in ROUTER_KINDS}
    cluster.patch(router["Role"], {"rules": []})
    cluster.patch(router["RoleBinding"], {"subjects": []})
    cluster.patch(
        router["ServiceAccount"], {"metadata": {"labels": {"app.kubernetes.io/name": "x"}}}
    )
    cluster.patch(path, {"spec": {"routing": {"policy": "round-robin"}}})  # a reconcile
    wait_for(
        lambda: (
            cluster.get(router["Role"])["rules"] and cluster.get(router["RoleBinding"])["subjects"]
        )
    )
    wait_for(
        lambda: (
            cluster.get(router["ServiceAccount"])["metadata"]["labels"]["app.kubernetes.io/name"]
            != "x"
        )
    )
    cluster.patch(path, {"spec": {"routing": {"inferencePool": True}}})
    wait_for(
        lambda: condition(cluster.get(path), "Degraded").get("reason") == "InferencePoolAPIMissing"
    )
    register_inference_pools(cluster.emulator)
    pool = f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools/full"
    wait_for(lambda: cluster.get(pool), message="the InferencePool")
    cluster.patch(path, {"spec": {"routing": {"endpointPicker": {"port": 9003}}}})
    wait_for(lambda: cluster.get(pool)["spec"]["endpointPickerRef"]["port"] == {"number": 9003})
    cluster.patch(path, {"spec": {"routing": {"policy": "none", "inferencePool": False}}})
    wait_for(lambda: cluster.get(pool) is None and cluster.get(router["Deployment"]) is None)
    wait_for(lambda: all(cluster.get(p) is None for p in router.values()), message="router gone")


def _multi_pod(cluster: Cluster) -> None:
    """A replica over two pods: the LWS API looked for, then (installed) its
    LeaderWorkerSet created, watched, followed and deleted when one pod is enough."""
    engine = {"tensorParallelSize": 2, "pipelineParallelSize": 2}
    create_llmd(cluster, "group", engine=engine, resources={"gpus": 2})
    path = object_path("LLMDeployment", NS, "group")
    wait_for(
        lambda: condition(cluster.get(path), "Degraded").get("reason") == "LeaderWorkerSetMissing"
    )
    install_leader_worker_sets(cluster)
    lws = object_path("LeaderWorkerSet", NS, "group")
    wait_for(lambda: cluster.get(lws), message="the LeaderWorkerSet")
    wait_for(
        lambda: any(
            "leaderworkersets" in p and q.get("watch") for _, p, q in cluster.operator_requests()
        ),
        message="the LeaderWorkerSets watched",
    )
    cluster.patch(path + "/scale", {"spec": {"replicas": 2}})
    wait_for(lambda: cluster.get(lws)["spec"]["replicas"] == 2, message="the LWS scaled")
    cluster.patch(path, {"spec": {"engine": {"pipelineParallelSize": 1}}})
    wait_for(lambda: cluster.get(lws) is None, message="the LWS deleted")


def _autoscale(cluster: Cluster) -> None:
    """An autoscaled resource: taken over at min replicas, evaluated (EndpointSlices and
    HPAs listed), a `kubectl scale` set back."""
    create_llmd(
        cluster,
        "auto",
        model={"source": "hf://org/auto"},
        autoscaling={"minReplicas": 0, "maxReplicas": 2},
    )
    path = object_path("LLMDeployment", NS, "auto")

    def reason() -> str | None:
        return ((cluster.get(path).get("status") or {}).get("autoscaling") or {}).get("reason")

    wait_for(lambda: reason() not in (None, "Started"), message="an evaluation")
    cluster.patch(path + "/scale", {"spec": {"replicas": 2}})
    wait_for(lambda: cluster.get(path)["spec"]["replicas"] == 0, message="scale set back")


def _record(tmp_path, monkeypatch, watch: list[str]) -> tuple[set, set]:
    """(namespaced, cluster-level) permissions the operator used."""
    with emulated_cluster(tmp_path) as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
        monkeypatch.setenv("KUBELLM_OPERATOR_RECHECK_SECONDS", "0.5")
        monkeypatch.setenv("KUBELLM_AUTOSCALE_INTERVAL_SECONDS", "0.3")
        args = ["run", "--standalone", "-m", "kubellm.operator.handlers"]
        args += [f"--namespace={n}" for n in watch] or ["-A"]
        with KopfRunner(args, reraise=False) as runner:
            _scenario(cluster)
            if watch:  # kopf also keeps track of which namespaces exist
                wait_for(
                    lambda: any(
                        p == "/api/v1/namespaces" and q.get("watch")
                        for _, p, q in cluster.operator_requests()
                    )
                )
        assert runner.exception is None, runner.output
        requests = cluster.operator_requests()
    namespaced, cluster_level = set(), set()
    for method, path, query in requests:
        needed = permission_of(method, path, query)
        if needed is not None:
            (namespaced if "/namespaces/" in path else cluster_level).add(needed)
    # granting a Role needs its permissions held (or "bind"): RBAC forbids escalation
    return namespaced | granted(DISCOVERY_RULES), cluster_level


def _rules(values: dict[str, Any]) -> dict[tuple[str, str | None], set]:
    """(kind, namespace) -> granted permissions, from the rendered chart."""
    rendered = yaml.safe_load_all(render(values)["kubellm/templates/rbac.yaml"])
    return {
        (d["kind"], d["metadata"].get("namespace")): granted(d["rules"])
        for d in rendered
        if d and d["kind"] in ("ClusterRole", "Role")
    }


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(tmp_path, monkeypatch):
    namespaced, cluster_level = _record(tmp_path, monkeypatch, [])
    assert ("apps", "deployments", "patch") in namespaced  # the scenario did run
    rules = _rules({})
    assert list(rules) == [("ClusterRole", None)]
    assert rules[("ClusterRole", None)] == namespaced | cluster_level


@pytest.mark.parametrize("watch", [[NS]])
def test_namespaced_rbac_is_a_role_there_and_only_discovery_cluster_wide(
    tmp_path, monkeypatch, watch
):
    namespaced, cluster_level = _record(tmp_path, monkeypatch, watch)
    rules = _rules({"watchNamespaces": watch})
    assert rules[("Role", NS)] == namespaced
    assert rules[("ClusterRole", None)] == cluster_level

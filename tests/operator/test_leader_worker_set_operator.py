"""kopf against the emulator: a resource whose replica spans several pods waits, Degraded,
for the LeaderWorkerSet API without creating anything, then converges to a
LeaderWorkerSet once it is installed; its status follows the LWS, `kubectl scale`
reaches the LWS, and going back to one pod per replica swaps it for a Deployment."""

from __future__ import annotations

from kubellm.operator.kube import object_path
from tests.helpers import wait_for
from tests.operator.emulator import (
    condition,
    create_llmd,
    install_leader_worker_sets,
)
from tests.operator.manifests import validate_kubernetes
from tests.operator.operated import NS, child, operator

GROUP = {"tensorParallelSize": 8, "pipelineParallelSize": 2}


def test_a_multi_pod_replica_waits_for_lws_then_runs_as_one(cluster, monkeypatch):
    name = "big"
    path = object_path("LLMDeployment", NS, name)
    lws_path = object_path("LeaderWorkerSet", NS, name)
    with operator(cluster, monkeypatch) as runner:
        create_llmd(cluster, name, engine=GROUP, resources={"gpus": 8}, replicas=2)
        degraded = wait_for(
            lambda: (
                condition(c := cluster.get(path), "Degraded").get("reason")
                == "LeaderWorkerSetMissing"
                and c
            ),
            message="Degraded: LeaderWorkerSetMissing",
        )
        message = condition(degraded, "Degraded")["message"]
        assert "spans 2 pods" in message and "kubernetes-sigs/lws" in message
        for kind in ("Deployment", "Service", "PodDisruptionBudget"):
            assert child(cluster, kind, name) is None, f"a half-made {kind}"

        install_leader_worker_sets(cluster)  # no edit of the resource needed
        lws = wait_for(lambda: cluster.get(lws_path), message="the LeaderWorkerSet")
        validate_kubernetes(lws)
        assert lws["spec"]["replicas"] == 2 and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
        replicas = wait_for(lambda: child(cluster, "Service", f"{name}-replicas"))
        group = lws["spec"]["leaderWorkerTemplate"]
        leader = group["leaderTemplate"]["metadata"]["labels"]
        worker = group["workerTemplate"]["metadata"]["labels"]
        selector = replicas["spec"]["selector"]  # what the router sends requests to
        assert selector.items() <= leader.items() and not selector.items() <= worker.items()
        assert child(cluster, "Deployment", name) is None
        wait_for(
            lambda: condition(cluster.get(path), "Degraded").get("status") == "False",
            message="Degraded cleared",
        )

        # status from the LWS's, as its controller writes it (the router ready first),
        # once kopf watches LeaderWorkerSets (it starts when their CRD appears)
        wait_for(
            lambda: any(
                "leaderworkersets" in p and q.get("watch")
                for _, p, q in cluster.operator_requests()
            ),
            message="the LeaderWorkerSets watched",
        )
        router = object_path("Deployment", NS, f"{name}-router")
        wait_for(lambda: cluster.get(router), message="the router's Deployment")
        cluster.patch(router + "/status", {"status": {"replicas": 1, "readyReplicas": 1}})
        wait_for(lambda: condition(cluster.get(path), "Ready").get("reason") == "ReplicasNotReady")
        ready = {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}
        cluster.patch(lws_path + "/status", {"status": ready})
        cr = wait_for(
            lambda: condition(c := cluster.get(path), "Ready").get("status") == "True" and c,
            message="Ready from the LWS status",
        )
        assert cr["status"]["readyReplicas"] == 2
        assert condition(cr, "Progressing")["status"] == "False"

        # kubectl scale llmdeployment/big --replicas 3
        cluster.patch(path + "/scale", {"spec": {"replicas": 3}})
        wait_for(lambda: cluster.get(lws_path)["spec"]["replicas"] == 3, message="LWS scaled")
        cr = wait_for(
            lambda: (
                condition(c := cluster.get(path), "Ready").get("reason") == "PartiallyReady" and c
            ),
            message="2 of 3 ready",
        )
        assert "2/3 replicas ready" in condition(cr, "Ready")["message"]

        # back to one pod per replica: a Deployment, and the LWS deleted
        cluster.patch(path, {"spec": {"engine": {"pipelineParallelSize": 1}}})
        deployment = wait_for(lambda: child(cluster, "Deployment", name), message="Deployment")
        wait_for(lambda: cluster.get(lws_path) is None, message="the LWS deleted")
        assert deployment["spec"]["replicas"] == 3
    assert f"LeaderWorkerSet {name} deleted" in runner.output

"""Helpers for tests that run the operator with kopf against the emulated cluster."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kopf.testing import KopfRunner

from kubellm.operator.kube import object_path
from tests.helpers import wait_for
from tests.operator.emulator import Cluster

NS = "ml"


@contextmanager
def operator(cluster: Cluster, monkeypatch) -> Iterator[KopfRunner]:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("KUBELLM_RUNTIME_IMAGE", "registry.example/kubellm-runtime:test")
    monkeypatch.setenv("KUBELLM_OPERATOR_RECHECK_SECONDS", "0.5")
    monkeypatch.setenv("KUBELLM_AUTOSCALE_INTERVAL_SECONDS", "0.3")
    args = ["run", "--standalone", "-A", "--verbose", "-m", "kubellm.operator.handlers"]
    with KopfRunner(args, reraise=False) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert "Traceback" not in runner.output, runner.output


def child(cluster: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    return cluster.get(object_path(kind, NS, name))


def mark_ready(cluster: Cluster, name: str) -> None:
    """Report the resource's Deployments (the replicas' and, when routed, the router's)
    fully rolled out, as the kube-controller-manager would."""
    for deployment_name in (name, f"{name}-router"):
        deployment = wait_for(
            lambda n=deployment_name: child(cluster, "Deployment", n),
            message=f"Deployment {deployment_name}",
        )
        count = deployment["spec"]["replicas"]
        ready = {"replicas": count, "readyReplicas": count, "updatedReplicas": count}
        cluster.patch(object_path("Deployment", NS, deployment_name) + "/status", {"status": ready})


def events_for(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    events = cluster.get(f"/api/v1/namespaces/{NS}/events") or {"items": []}
    return [e for e in events["items"] if e.get("involvedObject", {}).get("name") == name]

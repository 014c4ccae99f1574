"""The operator's autoscaler, run by kopf against the emulated cluster: it takes over
spec.replicas, scales up at once on the load a pod's /metrics reports, resumes its delay
after a restart, sets back a `kubectl scale`, stands aside for an HPA or invalid bounds
(reported Degraded), and never scales down on a load it could not read. The loop with
real replicas and routers is `test_autoscaling_loop.py`'s."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kubellm.operator.kube import collection_path, object_path
from tests.helpers import free_port, wait_for
from tests.operator.emulator import (
    Cluster,
    condition,
    create_llmd,
    emulated_cluster,
    endpoint_slice,
)
from tests.operator.manifests import validate_kubernetes
from tests.operator.operated import NS, child, events_for, operator

HPAS = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers"


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """A cluster per test: the autoscaler writes status at every evaluation, and the
    emulator slows as the objects' histories grow."""
    with emulated_cluster(tmp_path) as running:
        yield running


def _cr(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.get(object_path("LLMDeployment", NS, name)) or {}


def _autoscaled(cluster: Cluster, name: str) -> dict[str, Any]:
    return (_cr(cluster, name).get("status") or {}).get("autoscaling") or {}


def _scale(cluster: Cluster, name: str, replicas: int) -> None:
    """What `kubectl scale` sends: a merge patch of the scale subresource."""
    cluster.patch(object_path("LLMDeployment", NS, name, "scale"), {"spec": {"replicas": replicas}})


def _replicas(cluster: Cluster, name: str) -> tuple[int, int]:
    """(spec.replicas, its Deployment's spec.replicas)."""
    deployment = child(cluster, "Deployment", name) or {"spec": {"replicas": None}}
    return _cr(cluster, name)["spec"].get("replicas"), deployment["spec"]["replicas"]


def test_a_new_resource_starts_at_min_replicas_and_keeps_its_cache(cluster, monkeypatch):
    name = "idle"
    autoscaling = {"minReplicas": 0, "maxReplicas": 3, "targetRequests": 4}
    with operator(cluster, monkeypatch):
        create_llmd(cluster, name, model={"source": "hf://org/idle"}, autoscaling=autoscaling)
        wait_for(lambda: _replicas(cluster, name) == (0, 0), message="zero replicas")
        saved = _autoscaled(cluster, name)
        assert saved["desiredReplicas"] == 0
        assert child(cluster, "PersistentVolumeClaim", f"{name}-model-cache") is not None
        assert child(cluster, "PodDisruptionBudget", name) is None
        routers = wait_for(lambda: child(cluster, "Deployment", f"{name}-router"))
        assert routers["spec"]["replicas"] == 2  # up to 3 replicas: routers do not churn
        validate_kubernetes(child(cluster, "Deployment", name))


def test_kubectl_scale_is_set_back_with_an_event(cluster, monkeypatch):
    name = "owned"
    create_llmd(cluster, name, model={"source": "hf://org/owned"}, replicas=2)
    with operator(cluster, monkeypatch):
        wait_for(lambda: _replicas(cluster, name) == (2, 2), message="two replicas")
        path = object_path("LLMDeployment", NS, name)
        autoscaling = {"minReplicas": 1, "maxReplicas": 4, "scaleDownDelaySeconds": 600}
        cluster.patch(path, {"spec": {"autoscaling": autoscaling}})
        wait_for(
            lambda: _autoscaled(cluster, name).get("desiredReplicas") == 2,
            message="a running resource keeps its count",
        )
        _scale(cluster, name, 4)
        wait_for(lambda: _replicas(cluster, name) == (2, 2), message="set back to 2")
        reasons = {e["reason"] for e in events_for(cluster, name)}
        assert "ReplicasOverwritten" in reasons
        cluster.patch(path, {"spec": {"autoscaling": None}})
        wait_for(
            lambda: "autoscaling" not in (_cr(cluster, name).get("status") or {}),
            message="status.autoscaling removed",
        )
        _scale(cluster, name, 3)  # no autoscaling: the user's count stands
        wait_for(lambda: _replicas(cluster, name) == (3, 3), message="the user's 3")


def test_an_hpa_on_the_same_resource_is_reported_and_not_fought(cluster, monkeypatch):
    name = "contested"
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "old-hpa", "namespace": NS},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "kubellm.dev/v1alpha1",
                "kind": "LLMDeployment",
                "name": name,
            },
            "minReplicas": 1,
            "maxReplicas": 5,
        },
    }
    validate_kubernetes(hpa)
    with operator(cluster, monkeypatch):
        create_llmd(
            cluster,
            name,
            model={"source": "hf://org/contested"},
            autoscaling={"minReplicas": 1, "maxReplicas": 2},
        )
        wait_for(lambda: _autoscaled(cluster, name).get("desiredReplicas") == 1)
        cluster.create(HPAS, hpa)
        degraded = wait_for(
            lambda: (
                (c := condition(_cr(cluster, name), "Degraded")).get("reason")
                == "AutoscalerConflict"
                and c
            ),
            message="Degraded AutoscalerConflict",
        )
        assert (
            "'old-hpa'" in degraded["message"]
            and "kubectl delete hpa old-hpa" in degraded["message"]
        )
        _scale(cluster, name, 5)  # the HPA's write: left alone while both claim it
        wait_for(lambda: _replicas(cluster, name) == (5, 5), message="the HPA's 5 stands")
        cluster.http.delete(f"{HPAS}/old-hpa").raise_for_status()
        wait_for(
            lambda: condition(_cr(cluster, name), "Degraded").get("status") == "False",
            message="recovered",
        )
        wait_for(lambda: _replicas(cluster, name) == (1, 1), message="back within bounds")


def test_invalid_bounds_are_reported_and_the_rest_converges(cluster, monkeypatch):
    """What CEL refuses, for an API server that does not enforce it (the emulator)."""
    name = "inverted"
    with operator(cluster, monkeypatch):
        create_llmd(
            cluster,
            name,
            model={"source": "hf://org/inverted"},
            replicas=1,
            routing={"policy": "none"},
            autoscaling={"minReplicas": 0, "maxReplicas": 0},
        )
        degraded = wait_for(
            lambda: (
                (c := condition(_cr(cluster, name), "Degraded")).get("reason")
                == "InvalidAutoscaling"
                and c
            ),
            message="Degraded InvalidAutoscaling",
        )
        for words in ("maxReplicas is 0", "routing.policy"):
            assert words in degraded["message"]
        assert child(cluster, "Deployment", name)["spec"]["replicas"] == 1
        assert _autoscaled(cluster, name) == {}


def test_a_load_that_cannot_be_read_never_scales_down(cluster, monkeypatch):
    name = "unread"
    create_llmd(cluster, name, model={"source": "hf://org/unread"}, replicas=3)
    dead = endpoint_slice(f"{name}-dead", name, free_port(), NS)  # /metrics fails there
    cluster.create(collection_path("EndpointSlice", NS), dead)
    with operator(cluster, monkeypatch):
        wait_for(lambda: _replicas(cluster, name) == (3, 3), message="three replicas")
        path = object_path("LLMDeployment", NS, name)
        autoscaling = {"minReplicas": 1, "maxReplicas": 3, "scaleDownDelaySeconds": 0}
        cluster.patch(path, {"spec": {"autoscaling": autoscaling}})
        wait_for(
            lambda: _autoscaled(cluster, name).get("reason") == "MetricsMissing",
            message="an evaluation without metrics",
        )
        for _ in range(3):  # several evaluations past the (zero) delay
            seen = _autoscaled(cluster, name)["window"]
            wait_for(lambda s=seen: _autoscaled(cluster, name)["window"] != s)
        saved = _autoscaled(cluster, name)
        assert saved["reason"] == "MetricsMissing" and "load" not in saved
        assert _replicas(cluster, name) == (3, 3)


class MetricsEndpoint:
    """A pod's /metrics on 127.0.0.1 whose gauges the test sets (the load the autoscaler
    reads)."""

    def __init__(self) -> None:
        self.text = ""
        self.port = free_port()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = endpoint.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def replica_load(self, running: int, waiting: int = 0) -> None:
        self.text = (
            f'kubellm:num_requests_running{{model_name="m"}} {running}\n'
            f'kubellm:num_requests_waiting{{model_name="m"}} {waiting}\n'
        )


def test_up_at_once_and_a_restarted_operator_resumes_the_delay(cluster, monkeypatch):
    name = "loaded"
    pod = MetricsEndpoint()
    pod.replica_load(running=7, waiting=0)
    cluster.create(
        collection_path("EndpointSlice", NS),
        endpoint_slice(f"{name}-{pod.port}", name, pod.port, NS),
    )
    autoscaling = {
        "minReplicas": 1,
        "maxReplicas": 4,
        "targetRequests": 2,
        "scaleDownDelaySeconds": 3600,
    }
    with operator(cluster, monkeypatch):
        create_llmd(
            cluster,
            name,
            model={"source": "hf://org/loaded"},
            routing={"policy": "none"},
            autoscaling=autoscaling,
        )
        wait_for(lambda: _replicas(cluster, name) == (4, 4), message="up at once to 4")
        assert _autoscaled(cluster, name)["load"] == 7
        pod.replica_load(running=1)
        wait_for(lambda: _autoscaled(cluster, name).get("reason") == "WaitingToScaleDown")
        (high,) = [e for e in _autoscaled(cluster, name)["window"] if e["replicas"] == 4]
    with operator(cluster, monkeypatch):  # a new operator process: only status remains
        seen = _autoscaled(cluster, name)["window"]
        wait_for(lambda: _autoscaled(cluster, name)["window"] != seen, message="evaluated")
        saved = _autoscaled(cluster, name)
        assert high in saved["window"]  # the delay runs from when the load fell, as before
        assert saved["reason"] == "WaitingToScaleDown" and saved["load"] == 1
        assert _replicas(cluster, name) == (4, 4)
    events = [(e["reason"], e["message"]) for e in events_for(cluster, name)]
    assert ("ScaledUp", "1 -> 4 replicas: load 7 requests (0 held), target 2 per replica") in events
    pod.server.shutdown()

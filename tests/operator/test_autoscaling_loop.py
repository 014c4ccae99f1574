"""The whole autoscaling loop on this machine: kopf against the emulated API server;
the kubelet's stand-in running real `kubellm serve` replicas and `kubellm route
--discover` routers as the operator's Deployments ask; clients through the routers with
the openai SDK. From zero a held request starts a replica and completes; load from many
clients raises the replicas to maxReplicas; idle, they go back to zero after the delay;
no request fails along the way."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
import yaml

from kubellm.operator.kube import collection_path, object_path
from tests.helpers import wait_for
from tests.operator.emulator import Cluster, condition, emulated_cluster
from tests.operator.kubelet import KubeletStandIn
from tests.operator.operated import NS, operator

pytestmark = pytest.mark.slow
NAME = "smol"
MANIFEST = {
    "apiVersion": "kubellm.dev/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": NAME, "namespace": NS},
    "spec": {
        "resources": {"gpus": 0},
        "engine": {"maxModelLen": 512},
        "autoscaling": {
            "minReplicas": 0,
            "maxReplicas": 2,
            "targetRequests": 2,
            "scaleDownDelaySeconds": 4,
        },
    },
}
REPLICA_ARGS = ("--kv-cache-memory-gib", "0.05")  # two replicas on a small machine
CLIENTS = 6  # three replicas' worth of load at targetRequests 2: more than maxReplicas
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _apply(cluster: Cluster, directory: Path) -> None:
    """`kubectl apply` where kubectl is installed, else the POST it would send."""
    manifest = directory / "autoscaled.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        cluster.create(collection_path("LLMDeployment", NS), MANIFEST)
        return
    command = [
        kubectl,
        "--kubeconfig",
        str(cluster.kubeconfig),
        "apply",
        "--validate=false",
        "-f",
        str(manifest),
    ]
    applied = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(url: str, max_tokens: int) -> str:
    reply = _client(url).chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content


class Clients:
    """CLIENTS threads, each asking again as soon as it has its answer, until stopped."""

    def __init__(self, routers: list[str]) -> None:
        self.stop = threading.Event()
        self.answers: list[str] = []
        self.failures: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(routers[i % len(routers)],))
            for i in range(CLIENTS)
        ]

    def _loop(self, url: str) -> None:
        while not self.stop.is_set():
            try:
                self.answers.append(_ask(url, 32))
            except Exception as exc:  # every failure is the test's finding
                self.failures.append(exc)

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)


def _counts(kubelet: KubeletStandIn, since: float) -> list[tuple[float, int, int]]:
    return [(round(t - since, 1), pods, ready) for t, pods, ready in kubelet.history]


def test_the_replicas_follow_the_load_from_zero_to_max_and_back(tmp_path, monkeypatch):
    path = object_path("LLMDeployment", NS, NAME)
    with (
        emulated_cluster(tmp_path) as cluster,
        operator(cluster, monkeypatch),
        KubeletStandIn(cluster, NS, NAME, REPLICA_ARGS) as kubelet,
    ):
        began = time.monotonic()
        _apply(cluster, tmp_path)
        routers = wait_for(
            lambda: len(kubelet.router_urls()) == 2 and kubelet.router_urls(),
            timeout=60,
            message="two routers",
        )
        ready = wait_for(
            lambda: (
                condition(cluster.get(path), "Ready").get("status") == "True"
                and condition(cluster.get(path), "Ready")
            ),
            message="Ready at zero",
        )
        assert ready["reason"] == "ScaledToZero" and kubelet.replica_pods() == 0
        assert [pods for _, pods, _ in kubelet.history] == [0]

        asked = time.monotonic()
        assert _ask(routers[0], 8)  # held by the router while a replica starts
        cold_start = time.monotonic() - asked
        assert kubelet.replica_pods() == 1

        with Clients(routers) as clients:
            wait_for(lambda: kubelet.history[-1][2] == 2, timeout=240, message="2 ready")
            served = len(clients.answers)
            wait_for(lambda: len(clients.answers) >= served + CLIENTS, timeout=120)
        assert not clients.failures, clients.failures
        assert cluster.get(path)["status"]["autoscaling"]["desiredReplicas"] == 2

        idle = time.monotonic()
        wait_for(lambda: kubelet.replica_pods() == 0, timeout=60, message="back to zero")
        to_zero = time.monotonic() - idle
        assert not kubelet.crashes, kubelet.crashes
        counts = [pods for _, pods, _ in kubelet.history]
        assert max(counts) == 2 and counts[-1] == 0
        # the status follows the Deployment's, which follows the pods: it may lag them
        wait_for(
            lambda: condition(cluster.get(path), "Ready")["reason"] == "ScaledToZero",
            timeout=30,
            message="Ready: ScaledToZero",
        )
    # after kopf's runner, which captures stdout: the figures for the record (pytest -s)
    print(
        f"\ncold start {cold_start:.1f} s; {len(clients.answers)} ramp answers, "
        f"0 failed; back to zero {to_zero:.1f} s after the load stopped; "
        f"(s, replica pods, ready): {_counts(kubelet, began)}"
    )

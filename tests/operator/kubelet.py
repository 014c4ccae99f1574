"""The kubelet's stand-in: for one LLMDeployment in the emulated cluster it plays the
kubelet, the Deployment controller and the EndpointSlice controller, with real
processes on 127.0.0.1.

Every POLL_SECONDS it reads the Deployments `<name>` (replicas: `kubellm serve`) and
`<name>-router` (routers: `kubellm route`), starts or stops processes to match their
`spec.replicas`, each with its container's environment as the operator wrote it
(`KUBELLM_*`; the pod's own host, port and volumes aside); publishes each process whose
`/health` answers 200 as an EndpointSlice of the Service that selects it (one slice per
process, since each has a port of its own); and reports the Deployments' status. A pod
is stopped as Kubernetes stops one: its endpoint is removed first, then SIGTERM, and
the process drains.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from kubellm.operator.kube import collection_path, object_path
from tests.operator.emulator import Cluster, endpoint_slice
from tests.runtime.serve_process import ServeProcess

POLL_SECONDS = 0.2
POD_ONLY = {"KUBELLM_HOST", "KUBELLM_PORT", "HF_HOME"}  # the pod's network and volumes
DRAIN_SECONDS = 30


@dataclass
class Pod:
    process: ServeProcess
    port: int
    ready: bool = False


@dataclass
class Workload:
    """One Deployment's pods and the Service whose EndpointSlices list them."""

    deployment: str
    service: str
    command: str
    args: tuple[str, ...]
    pods: list[Pod] = field(default_factory=list)
    reported: dict[str, int] = field(default_factory=dict)


class KubeletStandIn:
    def __init__(
        self, cluster: Cluster, namespace: str, name: str, replica_args: tuple[str, ...] = ()
    ) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.http = httpx.Client(base_url=cluster.url, timeout=10)
        self.replicas = Workload(name, f"{name}-replicas", "serve", replica_args)
        self.routers = Workload(f"{name}-router", name, "route", ())
        self.history: list[tuple[float, int, int]] = []  # (time, replica pods, ready ones)
        self.crashes: list[str] = []  # output of processes that exited on their own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> KubeletStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(30)
        for workload in (self.replicas, self.routers):
            for pod in workload.pods:
                pod.process.__exit__()
        self.http.close()

    def router_urls(self) -> list[str]:
        return [pod.process.url for pod in self.routers.pods if pod.ready]

    def replica_pods(self) -> int:
        """Replica processes running (as last recorded in `history`)."""
        return self.history[-1][1] if self.history else 0

    def _run(self) -> None:
        while not self._stop.is_set():
            for workload in (self.routers, self.replicas):
                self._sync(workload)
            counts = (len(self.replicas.pods), sum(p.ready for p in self.replicas.pods))
            if not self.history or self.history[-1][1:] != counts:
                self.history.append((time.monotonic(), *counts))
            time.sleep(POLL_SECONDS)

    def _sync(self, workload: Workload) -> None:
        deployment = self._get(object_path("Deployment", self.namespace, workload.deployment))
        wanted = deployment["spec"].get("replicas", 1) if deployment else 0
        while len(workload.pods) < wanted:
            workload.pods.append(self._start(workload, deployment))
        while len(workload.pods) > wanted:
            self._stop_pod(workload, workload.pods.pop())
        for pod in list(workload.pods):
            if pod.process.proc.poll() is not None:  # restarted, as its container would be
                self.crashes.append(pod.process.output)
                workload.pods.remove(pod)
                self._stop_pod(workload, pod)
            elif not pod.ready and _healthy(pod.process.url):
                pod.ready = True
                self._create(
                    collection_path("EndpointSlice", self.namespace),
                    endpoint_slice(
                        _slice_name(workload, pod), workload.service, pod.port, self.namespace
                    ),
                )
        if deployment is not None:
            self._report(workload)

    def _start(self, workload: Workload, deployment: dict[str, Any]) -> Pod:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {
            e["name"]: e["value"]
            for e in container.get("env", [])
            if "value" in e and e["name"] not in POD_ONLY
        }
        env["KUBECONFIG"] = str(self.cluster.kubeconfig)  # the pod's service account
        env["OMP_NUM_THREADS"] = "1"  # a pod's own core: the processes share this machine's
        process = ServeProcess(*workload.args, command=workload.command, env=env)
        return Pod(process, int(process.url.rsplit(":", 1)[1]))

    def _stop_pod(self, workload: Workload, pod: Pod) -> None:
        self.http.delete(object_path("EndpointSlice", self.namespace, _slice_name(workload, pod)))
        if pod.process.proc.poll() is None:
            pod.process.proc.send_signal(signal.SIGTERM)
        threading.Thread(target=_reap, args=(pod.process,), daemon=True).start()

    def _report(self, workload: Workload) -> None:
        ready = sum(pod.ready for pod in workload.pods)
        status = {
            "replicas": len(workload.pods),
            "updatedReplicas": len(workload.pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
        }
        if status != workload.reported:
            path = object_path("Deployment", self.namespace, workload.deployment, "status")
            headers = {"Content-Type": "application/merge-patch+json"}
            self.http.patch(path, json={"status": status}, headers=headers).raise_for_status()
            workload.reported = status

    def _get(self, path: str) -> dict[str, Any] | None:
        response = self.http.get(path)
        return None if response.status_code == 404 else response.raise_for_status().json()

    def _create(self, path: str, body: dict[str, Any]) -> None:
        self.http.post(path, json=body).raise_for_status()


def _slice_name(workload: Workload, pod: Pod) -> str:
    return f"{workload.service}-{pod.port}"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _reap(process: ServeProcess) -> None:
    try:
        process.proc.wait(DRAIN_SECONDS)
    except subprocess.TimeoutExpired:
        process.proc.kill()

"""The operator run by kopf against kmock's KubernetesEmulator on 127.0.0.1, end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kubellm.operator.kube import collection_path, object_path
from kubellm.operator.naming import TEMPLATE_HASH
from tests.helpers import free_port, wait_for
from tests.operator.emulator import Cluster, condition, create_llmd, emulated_cluster
from tests.operator.manifests import ROOT, load_yaml_documents, validate_kubernetes
from tests.operator.operated import NS, child, events_for, mark_ready, operator


def test_the_operator_converges_scales_reports_and_survives_a_restart(cluster, monkeypatch):
    """Today's objects (`routing.policy: none`); the router's have a test of their own."""
    name = "llama"
    with operator(cluster, monkeypatch):
        cr = create_llmd(
            cluster,
            name,
            model={"source": "hf://org/model"},
            replicas=2,
            routing={"policy": "none"},
        )
        deployment = wait_for(lambda: child(cluster, "Deployment", name), message="Deployment")
        service = wait_for(lambda: child(cluster, "Service", name), message="Service")
        claim = wait_for(lambda: child(cluster, "PersistentVolumeClaim", f"{name}-model-cache"))
        budget = wait_for(lambda: child(cluster, "PodDisruptionBudget", name))
        for obj in (deployment, service, claim, budget):
            validate_kubernetes(obj)
            (owner,) = obj["metadata"]["ownerReferences"]  # deleted with the resource
            assert owner["uid"] == cr["metadata"]["uid"] and owner["controller"] is True
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.example/kubellm-runtime:test"
        assert deployment["spec"]["replicas"] == 2

        path = object_path("LLMDeployment", NS, name)
        status = wait_for(lambda: (cluster.get(path) or {}).get("status", {}).get("conditions"))
        cr = cluster.get(path)
        assert cr["status"]["endpoint"] == f"http://{name}.{NS}.svc/v1"
        assert "app.kubernetes.io/instance=llama" in cr["status"]["selector"]
        assert condition(cr, "Ready")["reason"] == "ReplicasNotReady" and status

        # spec.replicas: only the Deployment's replicas change (no new pod template)
        deployment_path = object_path("Deployment", NS, name)
        template = cluster.get(deployment_path)["spec"]["template"]
        cluster.patch(path, {"spec": {"replicas": 3}})
        scaled = wait_for(
            lambda: (d := cluster.get(deployment_path))["spec"]["replicas"] == 3 and d
        )
        assert scaled["spec"]["template"] == template
        patches = [p for m, p in cluster.requests() if m == "PATCH" and p == deployment_path]
        assert len(patches) == 1

        # a controller's status patch on the Deployment flows to the resource
        ready = {"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3, "availableReplicas": 3}
        cluster.patch(deployment_path + "/status", {"status": ready})
        cr = wait_for(
            lambda: condition(c := cluster.get(path), "Ready").get("status") == "True" and c
        )
        assert cr["status"]["readyReplicas"] == 3 and cr["status"]["replicas"] == 3
        assert condition(cr, "Ready")["reason"] == "AllReplicasReady"
        assert condition(cr, "Progressing")["status"] == "False"
        assert condition(cr, "Degraded")["status"] == "False"
        assert cr["status"]["observedGeneration"] == cr["metadata"]["generation"]
        assert wait_for(lambda: any(e["reason"] == "Ready" for e in events_for(cluster, name)))

        # an engine change rolls the pods: a new template hash
        cluster.patch(path, {"spec": {"engine": {"maxNumSeqs": 8}}})
        rolled = wait_for(
            lambda: (d := cluster.get(deployment_path))["spec"]["template"] != template and d
        )
        annotations = rolled["spec"]["template"]["metadata"]["annotations"]
        assert annotations[TEMPLATE_HASH] != template["metadata"]["annotations"][TEMPLATE_HASH]

    # restart: the resume handler finds everything in place and writes nothing
    paths = [
        path,
        deployment_path,
        object_path("Service", NS, name),
        object_path("PersistentVolumeClaim", NS, f"{name}-model-cache"),
        object_path("PodDisruptionBudget", NS, name),
    ]
    versions = {p: cluster.versions(p) for p in paths}
    served = len(cluster.requests())
    with operator(cluster, monkeypatch):
        wait_for(lambda: _resumed(cluster, served, deployment_path), message="the resume")
    assert {p: cluster.versions(p) for p in paths} == versions
    creates = [p for m, p in cluster.requests()[served:] if m == "POST" and "events" not in p]
    assert creates == []


def _resumed(cluster: Cluster, served: int, deployment_path: str) -> bool:
    """The resume handler has read the Deployment for its status (its last step)."""
    since = [p for m, p in cluster.requests()[served:] if m == "GET"]
    service_path = deployment_path.replace("apis/apps/v1", "api/v1").replace(
        "deployments", "services"
    )
    return service_path in since and deployment_path in since[since.index(service_path) :]


def test_a_resource_that_cannot_work_is_degraded_without_a_deployment(cluster, monkeypatch):
    name = "gated"
    with operator(cluster, monkeypatch):
        gated = {"source": "hf://org/gated", "hfTokenSecretRef": {"name": "hf", "key": "token"}}
        create_llmd(cluster, name, model=gated)
        path = object_path("LLMDeployment", NS, name)
        cr = wait_for(lambda: condition(c := cluster.get(path), "Degraded") and c)
        degraded = condition(cr, "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "SecretNotFound"
        assert "'hf' not found" in degraded["message"]
        assert child(cluster, "Deployment", name) is None
        warnings = wait_for(
            lambda: [e for e in events_for(cluster, name) if e["type"] == "Warning"]
        )
        assert warnings[0]["reason"] == "SecretNotFound"

        # the Secret appears: the recheck finds it, the Deployment follows, Degraded clears
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "hf", "namespace": NS},
            "data": {"token": "aGZfeHl6"},
        }
        cluster.create(collection_path("Secret", NS), secret)
        wait_for(lambda: child(cluster, "Deployment", name), message="Deployment after the fix")
        cr = wait_for(
            lambda: condition(c := cluster.get(path), "Degraded")["status"] == "False" and c
        )
        assert condition(cr, "Degraded")["reason"] == "AsExpected"
        assert wait_for(lambda: any(e["reason"] == "Recovered" for e in events_for(cluster, name)))


def test_a_spec_only_an_edit_can_fix_is_reported_not_retried(cluster, monkeypatch):
    name = "big"
    with operator(cluster, monkeypatch) as runner:
        create_llmd(
            cluster,
            name,
            model={"source": "hf://org/big"},
            engine={"tensorParallelSize": 4},
            resources={"gpus": 3},
        )
        path = object_path("LLMDeployment", NS, name)
        cr = wait_for(lambda: condition(c := cluster.get(path), "Degraded") and c)
        assert condition(cr, "Degraded")["reason"] == "RanksDoNotDivide"
        assert child(cluster, "Deployment", name) is None
    assert "Handler 'reconcile' succeeded" in runner.output  # reported, so no retry loop
    assert "Handler 'reconcile' failed" not in runner.output


@pytest.mark.parametrize("example", ["gpu-tp2-13b.yaml", "gpu-tp4-70b.yaml"])
def test_a_tensor_parallel_example_gets_one_pod_with_a_gpu_per_rank(example, cluster, monkeypatch):
    (cr,) = load_yaml_documents(ROOT / "examples" / example)
    name, spec = cr["metadata"]["name"], cr["spec"]
    ranks = spec["engine"]["tensorParallelSize"]
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hf-token", "namespace": NS},
        "data": {"token": "aGZfeHl6"},
    }
    if cluster.get(object_path("Secret", NS, "hf-token")) is None:
        cluster.create(collection_path("Secret", NS), secret)
    with operator(cluster, monkeypatch):
        create_llmd(cluster, name, **spec)
        deployment = wait_for(lambda: child(cluster, "Deployment", name), message="Deployment")
        claim = wait_for(lambda: child(cluster, "PersistentVolumeClaim", f"{name}-model-cache"))
        validate_kubernetes(deployment)
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(ranks)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["KUBELLM_TENSOR_PARALLEL_SIZE"] == str(ranks)
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": spec["shm"]["sizeLimit"]}
        assert container["startupProbe"]["httpGet"]["path"] == "/health"
        assert claim["spec"]["resources"]["requests"]["storage"] == spec["cache"]["size"]
        mark_ready(cluster, name)
        path = object_path("LLMDeployment", NS, name)
        cr = wait_for(
            lambda: condition(c := cluster.get(path), "Ready").get("status") == "True" and c,
            message="Ready",
        )
        assert condition(cr, "Degraded")["status"] == "False"


def test_the_operator_rides_out_api_server_trouble(cluster, monkeypatch):
    """429s, 500s, a lost create answer (409 on the retry), a 401 (rotated token), and
    the API server restarting mid-run: the operator keeps running, converges, and writes
    no child twice."""
    first, second = "sturdy", "after-restart"
    emulator, start = cluster.emulator, len(cluster.requests())
    with operator(cluster, monkeypatch):
        emulator.inject("POST", f"/namespaces/{NS}/deployments", 500, 3)
        emulator.inject("POST", f"/namespaces/{NS}/services", 429, 2)
        emulator.inject("POST", f"/namespaces/{NS}/persistentvolumeclaims", 409, 1, applied=True)
        emulator.inject("GET", f"/deployments/{first}", 401, 1)
        create_llmd(cluster, first, model={"source": "hf://org/sturdy"})
        for kind, child_name in (
            ("Deployment", first),
            ("Service", first),
            ("PersistentVolumeClaim", f"{first}-model-cache"),
        ):
            wait_for(lambda k=kind, n=child_name: child(cluster, k, n), message=kind)
        assert emulator.faults_served == 7  # each fault was met and ridden out
        cluster.restart(down_seconds=2)  # watch streams cut; requests refused for 2 s
        time.sleep(3)
        create_llmd(cluster, second, model={"source": "hf://org/sturdy"})
        wait_for(
            lambda: child(cluster, "Deployment", second),
            timeout=60,
            message="a resource created after the restart",
        )
        cluster.patch(object_path("LLMDeployment", NS, first), {"spec": {"replicas": 2}})
        wait_for(
            lambda: child(cluster, "Deployment", first)["spec"]["replicas"] == 2,
            timeout=60,
            message="an edit after the restart",
        )
    # the creates that reached the store (a fault answers before it): each child once per
    # resource (two Deployments and two Services each: the replicas' and the router's);
    # the claim whose 201 was lost is not created again (409: it exists)
    creates = [p for m, p in cluster.requests()[start:] if m == "POST"]
    expected = {"deployments": 4, "services": 4, "persistentvolumeclaims": 2}
    for plural, count in expected.items():
        assert sum(p.endswith(f"/namespaces/{NS}/{plural}") for p in creates) == count, plural


def test_a_bigger_cache_grows_the_claim_and_a_refused_resize_is_reported(cluster, monkeypatch):
    name = "cached"
    claim_path = object_path("PersistentVolumeClaim", NS, f"{name}-model-cache")
    path = object_path("LLMDeployment", NS, name)

    def storage() -> str | None:
        claim = cluster.get(claim_path) or {"spec": {"resources": {"requests": {}}}}
        return claim["spec"]["resources"]["requests"].get("storage")

    def replicas() -> int:
        return (child(cluster, "Deployment", name) or {"spec": {}})["spec"].get("replicas")

    with operator(cluster, monkeypatch):
        create_llmd(cluster, name, model={"source": "hf://org/cached"}, cache={"size": "10Gi"})
        wait_for(lambda: storage() == "10Gi", message="the claim")
        cluster.patch(path, {"spec": {"cache": {"size": "20Gi"}}})
        wait_for(lambda: storage() == "20Gi", message="the claim grown")
        cluster.patch(path, {"spec": {"cache": {"size": "15000Mi"}, "replicas": 2}})
        wait_for(lambda: replicas() == 2, message="the smaller size handled")
        assert storage() == "20Gi"  # a claim never shrinks
        cluster.emulator.refuse_claim_resize = True
        try:
            cluster.patch(path, {"spec": {"cache": {"size": "40Gi"}, "replicas": 3}})
            wait_for(lambda: replicas() == 3, message="the rest converged anyway")
            refused = wait_for(
                lambda: [e for e in events_for(cluster, name) if e["reason"] == "CacheNotResized"]
            )
        finally:
            cluster.emulator.refuse_claim_resize = False
        assert refused[0]["type"] == "Warning" and "40Gi" in refused[0]["message"]
        assert "storageclass that provisions the pvc must support resize" in refused[0]["message"]
        assert storage() == "20Gi"


def test_kubellm_operator_watches_its_namespace_and_answers_its_liveness_probe(cluster):
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "kubellm",
            "operator",
            "--namespace",
            NS,
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        create_llmd(cluster, "cli", resources={"gpus": 0})
        wait_for(lambda: child(cluster, "Deployment", "cli"), message="Deployment from the CLI")
        other = {
            "apiVersion": "kubellm.dev/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": "elsewhere", "namespace": "other"},
            "spec": {},
        }
        cluster.create(collection_path("LLMDeployment", "other"), other)
        assert wait_for(lambda: _live(port), message="liveness") == 200
        assert cluster.get(object_path("Deployment", "other", "elsewhere")) is None
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output


def _live(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code
    except httpx.TransportError:
        return None


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_applies_an_example_and_gets_it_with_printer_columns(tmp_path, monkeypatch):
    """A cluster of its own: the module's holds a dozen resources by now, each with its
    router, and an operator that starts resumes them all (slow on a loaded CI machine)."""
    with emulated_cluster(tmp_path) as cluster:
        _kubectl_apply_and_get(cluster, monkeypatch)


def _kubectl_apply_and_get(cluster: Cluster, monkeypatch) -> None:
    kubectl = [KUBECTL, "--kubeconfig", str(cluster.kubeconfig), "-n", NS]
    example = ROOT / "examples" / "cpu-smollm2.yaml"
    with operator(cluster, monkeypatch):
        applied = subprocess.run(
            [*kubectl, "apply", "--validate=false", "-f", str(example)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stderr
        assert "llmdeployment.kubellm.dev/smollm2 created" in applied.stdout
        mark_ready(cluster, "smollm2")
        path = object_path("LLMDeployment", NS, "smollm2")
        wait_for(lambda: condition(cluster.get(path), "Ready").get("status") == "True")
    listed = subprocess.run(
        [*kubectl, "get", "llmd", "smollm2", "-o", "wide"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    header, row = (line.split() for line in listed.stdout.splitlines()[:2])
    assert header == ["NAME", "MODEL", "READY", "DESIRED", "LOAD", "STATUS", "ENDPOINT", "AGE"]
    assert row[:6] == [
        "smollm2",
        "builtin://smollm2-135m-instruct",
        "1",
        "1",  # LOAD blank:
        "AllReplicasReady",
        f"http://smollm2.{NS}.svc/v1",
    ]  # not autoscaled

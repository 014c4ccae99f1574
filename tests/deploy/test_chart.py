"""The Helm chart, linted and rendered by Helm's own SDK; every object it renders
validates against Kubernetes' schemas."""

from __future__ import annotations

import helm_python
import pytest

from tests.deploy.chart import CHART, NAMESPACE, render, rendered_objects
from tests.operator.manifests import ROOT, validate_kubernetes

VARIANTS = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "hf-token": {"hfToken": {"create": True, "token": "hf_abc"}},
    "own-service-account": {
        "serviceAccount": {"create": False, "name": "ops"},
        "rbac": {"create": False},
    },
    "tuned": {
        "image": {"repository": "registry.example/op", "tag": "1.2.3"},
        "runtimeImage": {"repository": "registry.example/rt", "tag": "cpu"},
        "verbose": True,
        "recheckSeconds": 5,
        "healthPort": 9090,
        "nodeSelector": {"pool": "system"},
        "tolerations": [{"key": "x", "operator": "Exists"}],
    },
}


def test_the_chart_lints_strictly():
    report = helm_python.lint(str(CHART), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # warnings and errors


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_validates(variant):
    objects = rendered_objects(VARIANTS[variant])
    assert {"Deployment", "Service"} <= {o["kind"] for o in objects}
    for obj in objects:
        validate_kubernetes(obj)


def _operator(values) -> dict:
    deployment = next(o for o in rendered_objects(values) if o["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]


def test_the_operator_watches_what_it_is_told_and_hands_out_the_runtime_image():
    args = _operator({})["containers"][0]["args"]
    assert "--all-namespaces" in args and "--liveness=http://0.0.0.0:8080/healthz" in args
    namespaced = _operator(VARIANTS["namespaced"])["containers"][0]
    assert (
        "--namespace=team-a" in namespaced["args"] and "--all-namespaces" not in namespaced["args"]
    )
    tuned = _operator(VARIANTS["tuned"])["containers"][0]
    env = {e["name"]: e["value"] for e in tuned["env"]}
    assert env["KUBELLM_RUNTIME_IMAGE"] == "registry.example/rt:cpu"
    assert tuned["image"] == "registry.example/op:1.2.3" and "--verbose" in tuned["args"]
    assert tuned["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_the_operator_pod_is_restricted():
    pod = _operator({})
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}


def test_rbac_follows_watch_namespaces():
    kinds = [
        (o["kind"], o["metadata"].get("namespace"))
        for o in rendered_objects(VARIANTS["namespaced"])
    ]
    assert ("Role", "team-a") in kinds and ("RoleBinding", "team-b") in kinds
    assert not [k for k in kinds if k[0] == "Role" and k[1] not in ("team-a", "team-b")]
    none = [o["kind"] for o in rendered_objects(VARIANTS["own-service-account"])]
    assert "ClusterRole" not in none and "ServiceAccount" not in none


def test_a_helm_test_hook_checks_the_operator_health():
    hooks = [
        o
        for o in rendered_objects({})
        if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    ]
    (pod,) = hooks
    assert "/healthz" in " ".join(pod["spec"]["containers"][0]["command"])


def test_the_hf_token_secret_is_optional_and_needs_a_token():
    assert "Secret" not in [o["kind"] for o in rendered_objects({})]
    secret = next(o for o in rendered_objects(VARIANTS["hf-token"]) if o["kind"] == "Secret")
    assert secret["stringData"] == {"token": "hf_abc"}
    with pytest.raises(helm_python.HelmError, match=r"hfToken\.token is empty"):
        render({"hfToken": {"create": True}})


@pytest.mark.parametrize(
    "values",
    [
        {"watchNamespaces": "team-a"},
        {"watchNamespaces": ["Bad_Name"]},
        {"healthPort": 80},
        {"image": {"repository": ""}},
        {"unknownKey": 1},
        {"recheckSeconds": 0},
    ],
)
def test_the_values_schema_refuses_bad_values(values):
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_notes_tell_the_next_command():
    notes = render({})["kubellm/templates/NOTES.txt"]
    assert "kubectl apply" in notes and "helm test" in notes and "--server-side" in notes


def test_the_chart_crd_is_the_one_crd():
    """Helm installs the chart's crds/ copy; it must be the generated CRD, byte for byte."""
    source = (ROOT / "crds" / "llmdeployment.yaml").read_text()
    (crd,) = helm_python.Chart.load(str(CHART)).crds
    data = crd["data"]
    assert (data if isinstance(data, str) else bytes(data).decode()) == source

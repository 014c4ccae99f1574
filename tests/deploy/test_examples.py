"""Every example, through the operator's builders, gives objects Kubernetes accepts."""

from __future__ import annotations

import pytest

from kubellm.operator.builders import build_children
from tests.operator.manifests import ROOT, load_yaml_documents, validate_kubernetes

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_children_validate(path):
    for document in load_yaml_documents(path):
        if document["kind"] != "LLMDeployment":
            continue
        document["metadata"].update(namespace="default", uid="uid-example")
        children = build_children(
            document, "registry.example/kubellm-runtime:1", "registry.example/kubellm-operator:1"
        )
        assert any(c["kind"] == "Deployment" for c in children.desired)
        for child in children.desired:
            validate_kubernetes(child)


def test_the_hpa_example_targets_the_scale_subresource():
    hpa = next(
        d
        for d in load_yaml_documents(ROOT / "examples" / "autoscaling-hpa.yaml")
        if d["kind"] == "HorizontalPodAutoscaler"
    )
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "LLMDeployment"
    assert hpa["spec"]["scaleTargetRef"]["apiVersion"] == "kubellm.dev/v1alpha1"

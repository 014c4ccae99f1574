"""The CRD: generated from operator/crd.py, a valid structural CRD, and the schema
the examples (and the operator's own defaults) satisfy."""

from __future__ import annotations

import copy

import celpy
import pytest

from kubellm.operator.crd import SPEC, crd, render
from kubellm.operator.defaults import with_defaults
from tests.operator.manifests import (
    ROOT,
    custom_resource,
    llmd_validator,
    load_yaml_documents,
    validate_kubernetes,
)

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CEL = celpy.Environment()


def test_the_committed_crd_is_the_generated_one():
    assert (ROOT / "crds" / "llmdeployment.yaml").read_text() == render()


def test_the_crd_validates_as_a_crd():
    validate_kubernetes(crd())


def _nodes(schema, path="spec"):
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from _nodes(prop, f"{path}.{name}")
    if "items" in schema:
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}{{}}")


def test_the_schema_is_structural_and_described():
    root = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _nodes(root["properties"]["spec"]):
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        assert node.get("description") or path.endswith("[]") or "{" in path, path


def test_an_empty_spec_defaults_to_a_working_builtin_cpu_less_deployment():
    spec = with_defaults({})
    assert spec["model"]["source"] == "builtin://smollm2-135m-instruct"
    assert spec["replicas"] == 1 and spec["engine"]["maxNumBatchedTokens"] == 2048
    assert spec["probes"]["startupTimeoutSeconds"] == 1800
    assert spec["cache"] == {"enabled": True, "size": "50Gi", "accessMode": "ReadWriteOnce"}
    llmd_validator().validate(custom_resource(**spec))


def test_defaults_keep_what_the_user_set():
    spec = with_defaults({"engine": {"maxNumSeqs": 8}, "replicas": 0})
    assert spec["engine"]["maxNumSeqs"] == 8 and spec["engine"]["blockSize"] == 16
    assert spec["replicas"] == 0


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path):
    documents = load_yaml_documents(path)
    assert any(d["kind"] == "LLMDeployment" for d in documents)
    for document in documents:
        if document["kind"] == "LLMDeployment":
            llmd_validator().validate(document)
            llmd_validator().validate(custom_resource(**with_defaults(document["spec"])))
        else:
            validate_kubernetes(document)


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"replicas": -1}, "replicas"),
        ({"model": {"source": "s3://bucket/model"}}, "source"),
        ({"model": {"source": "hf://just-a-name"}}, "source"),
        ({"engine": {"dtype": "int8"}}, "dtype"),
        ({"engine": {"gpuMemoryUtilization": 0}}, "gpuMemoryUtilization"),
        ({"engine": {"gpuMemoryUtilization": 1.5}}, "gpuMemoryUtilization"),
        ({"cache": {"accessMode": "ReadWriteSometimes"}}, "accessMode"),
        ({"cache": {"size": "lots"}}, "size"),
        ({"resources": {"gpus": "one"}}, "gpus"),
        ({"apiKeySecretRef": {"name": "only-a-name"}}, "key"),
        ({"service": {"port": 70000}}, "port"),
        ({"autoscaling": {"maxReplicas": 0}}, "maxReplicas"),
        ({"autoscaling": {"minReplicas": 1}}, "maxReplicas"),
        ({"autoscaling": {"maxReplicas": 2, "minReplicas": -1}}, "minReplicas"),
        ({"autoscaling": {"maxReplicas": 2, "targetRequests": 0}}, "targetRequests"),
    ],
)
def test_bad_resources_are_rejected(patch, where):
    document = copy.deepcopy(load_yaml_documents(ROOT / "examples" / "cpu-smollm2.yaml")[0])
    for key, value in patch.items():
        if isinstance(value, dict):
            document["spec"].setdefault(key, {}).update(value)
        else:
            document["spec"][key] = value
    errors = list(llmd_validator().iter_errors(document))
    assert errors and any(where in str(e.path) or where in e.message for e in errors)


def _cel_failures(value, schema) -> list[str]:
    """The messages of the CEL rules (x-kubernetes-validations) `value` breaks, each
    evaluated where it is declared with `self` bound there, as the API server does."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = CEL.program(CEL.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            failures.append(rule["message"])
    for name, prop in schema.get("properties", {}).items():
        if isinstance(value, dict) and name in value:
            failures += _cel_failures(value[name], prop)
    return failures


def test_every_example_passes_the_cel_rules():
    for path in EXAMPLES:
        for document in load_yaml_documents(path):
            if document["kind"] == "LLMDeployment":
                assert _cel_failures(with_defaults(document["spec"]), SPEC) == [], path.name


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "cannot exceed"),
        (
            {"routing": {"policy": "none"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}},
            "set routing.policy to prefix",
        ),
        ({"resources": {"gpus": 3}, "engine": {"tensorParallelSize": 4}}, "must fit in"),
        (
            {
                "resources": {"gpus": 3},
                "engine": {"tensorParallelSize": 4, "pipelineParallelSize": 2},
            },
            "must fit in resources.gpus (one pod) or be a multiple of it",
        ),
        ({"resources": {"gpus": 0}, "engine": {"tensorParallelSize": 2}}, "need GPUs"),
        ({"resources": {"gpus": 0}, "engine": {"pipelineParallelSize": 2}}, "need GPUs"),
        ({"model": {"source": "builtin://smollm2-135m-instruct", "revision": "v1"}}, "hf://"),
    ],
)
def test_the_cel_rules_refuse_with_what_to_set(spec, words):
    (message,) = _cel_failures(with_defaults(spec), SPEC)
    assert words in message


def test_the_cel_rules_allow_what_they_should():
    for spec in (
        {"autoscaling": {"minReplicas": 0, "maxReplicas": 1}},  # routed by default
        {"routing": {"policy": "none"}, "autoscaling": {"maxReplicas": 3}},  # min 1
        {"resources": {"gpus": 4}, "engine": {"tensorParallelSize": 4}},
        {"resources": {"gpus": 8}, "engine": {"tensorParallelSize": 4, "pipelineParallelSize": 2}},
    ):
        assert _cel_failures(with_defaults(spec), SPEC) == [], spec

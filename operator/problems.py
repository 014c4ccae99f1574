"""Why an LLMDeployment that passed the schema still cannot work.

Each problem becomes the `Degraded` condition's reason and a warning event; the
operator then leaves the Deployment (or LeaderWorkerSet) alone (its pods could only
fail) and checks again later, without crash-looping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubellm.operator.builders.deployment import pods_per_replica, ranks_of, uses_cache_claim
from kubellm.operator.kube import Kube, object_path
from kubellm.operator.source import SourceURI

CLUSTER_REASONS = frozenset(
    {
        "SecretNotFound",
        "SecretKeyNotFound",
        "ClaimNotFound",
        "InferencePoolAPIMissing",
        "LeaderWorkerSetMissing",
        "AutoscalerConflict",
    }
)
# Problems with one optional part only (a child, the autoscaler): the rest converges.
AUTOSCALING_REASONS = frozenset({"InvalidAutoscaling", "AutoscalerConflict"})
PARTIAL_REASONS = frozenset({"InferencePoolAPIMissing"}) | AUTOSCALING_REASONS
INFERENCE_POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools"
LEADER_WORKER_SETS = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/{namespace}/leaderworkersets"
LWS_INSTALL = (
    "kubectl apply --server-side -f https://github.com/kubernetes-sigs/lws/releases/download/"
    "<version>/manifests.yaml (see github.com/kubernetes-sigs/lws/releases)"
)
AUTOSCALERS = "/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers"
CONFLICT_WORDS = "also scales this LLMDeployment"  # in each AutoscalerConflict message


@dataclass(frozen=True)
class Problem:
    reason: str  # CamelCase, as Kubernetes condition reasons are
    message: str


def static_problems(spec: dict[str, Any]) -> list[Problem]:
    """What the spec alone says (the CRD's CEL rules say some of it too, where enforced)."""
    try:
        SourceURI.parse(spec["model"]["source"])
    except ValueError as exc:
        return [Problem("InvalidModelSource", str(exc))]
    gpus = spec["resources"]["gpus"]
    engine = spec["engine"]
    ranks = ranks_of(spec)
    layout = f"engine.tensorParallelSize {engine['tensorParallelSize']}"
    if engine["pipelineParallelSize"] > 1:
        layout += f" x engine.pipelineParallelSize {engine['pipelineParallelSize']}"
    problems = []
    if gpus == 0 and ranks > 1:
        problems.append(
            Problem(
                "TooFewGPUs",
                f"{layout} is {ranks} ranks but resources.gpus is 0: each rank needs a GPU "
                f"of its own; set resources.gpus to {ranks} (or to a divisor of it, a replica "
                f"then spanning several pods) or lower the parallel sizes",
            )
        )
    elif gpus and ranks > gpus and ranks % gpus:
        fits = max(d for d in range(1, gpus + 1) if ranks % d == 0)
        problems.append(
            Problem(
                "RanksDoNotDivide",
                f"{layout} is {ranks} ranks, more than resources.gpus {gpus} per pod, so a "
                f"replica spans several pods of {gpus} ranks each, but {ranks} does not "
                f"divide by {gpus}: set resources.gpus to a divisor of {ranks} (such as "
                f"{fits}) or change the parallel sizes",
            )
        )
    elif gpus > ranks:
        problems.append(
            Problem(
                "GPUsUnused",
                f"resources.gpus is {gpus} but {layout} is {ranks} ranks: "
                f"{gpus - ranks} GPU(s) per pod would sit idle",
            )
        )
    elif pods_per_replica(spec) > 1 and _shares_one_node_cache(spec):
        problems.append(
            Problem(
                "CacheNotShareable",
                f"{layout} spans {pods_per_replica(spec)} pods per replica, on different "
                f"nodes, which cannot all mount a ReadWriteOnce cache claim: set "
                f"cache.accessMode to ReadWriteMany (a storage class that has it), or "
                f"cache.enabled to false (each pod then downloads the model itself)",
            )
        )
    return problems + autoscaling_problems(spec)


def _shares_one_node_cache(spec: dict[str, Any]) -> bool:
    return uses_cache_claim(spec) and spec["cache"]["accessMode"] == "ReadWriteOnce"


def autoscaling_problems(spec: dict[str, Any]) -> list[Problem]:
    """What the CRD's schema and CEL refuse, for API servers that do not enforce them."""
    autoscaling = spec.get("autoscaling")
    if autoscaling is None:
        return []
    least, most = autoscaling.get("minReplicas", 1), autoscaling.get("maxReplicas", 0)
    messages = []
    if most < 1:
        messages.append(f"autoscaling.maxReplicas is {most}: set it to 1 or more")
    if least < 0 or least > most:
        messages.append(
            f"autoscaling.minReplicas is {least} and maxReplicas {most}: set "
            "minReplicas between 0 and maxReplicas"
        )
    if autoscaling.get("targetRequests", 1) < 1:
        messages.append("autoscaling.targetRequests must be 1 or more (requests per replica)")
    if least == 0 and spec["routing"]["policy"] == "none":
        messages.append(
            "autoscaling.minReplicas 0 needs a router to hold requests while no "
            "replica runs: set routing.policy to prefix (or another policy), or "
            "minReplicas to 1 or more"
        )
    message = "; ".join(messages) + "; the autoscaler leaves spec.replicas alone meanwhile"
    return [Problem("InvalidAutoscaling", message)] if messages else []


async def cluster_problems(
    kube: Kube, namespace: str, name: str, spec: dict[str, Any]
) -> list[Problem]:
    """What only the cluster can tell: referenced Secrets, keys and claims that are
    missing, an API that is, another autoscaler."""
    problems = []
    refs = {
        "spec.model.hfTokenSecretRef": spec["model"].get("hfTokenSecretRef"),
        "spec.apiKeySecretRef": spec.get("apiKeySecretRef"),
    }
    for field, ref in refs.items():
        if not ref:
            continue
        secret = await kube.get(object_path("Secret", namespace, ref["name"]))
        if secret is None:
            problems.append(Problem("SecretNotFound", f"{field}: Secret {ref['name']!r} not found"))
        elif ref["key"] not in {**secret.get("data", {}), **secret.get("stringData", {})}:
            problems.append(
                Problem(
                    "SecretKeyNotFound",
                    f"{field}: Secret {ref['name']!r} has no key {ref['key']!r}",
                )
            )
    source = SourceURI.parse(spec["model"]["source"])
    if source.claim is not None:
        claim = await kube.get(object_path("PersistentVolumeClaim", namespace, source.claim))
        if claim is None:
            problems.append(
                Problem(
                    "ClaimNotFound",
                    f"spec.model.source: PersistentVolumeClaim {source.claim!r} not found",
                )
            )
    if spec["routing"]["inferencePool"] and await _no_api(kube, INFERENCE_POOLS, namespace):
        problems.append(
            Problem(
                "InferencePoolAPIMissing",
                "spec.routing.inferencePool is true but the cluster has no InferencePool API "
                "(inference.networking.k8s.io/v1): install the Gateway API Inference Extension's "
                "CRDs (kubectl apply -f https://github.com/kubernetes-sigs/gateway-api-inference-"
                "extension/releases/latest/download/manifests.yaml) or set it to false; the rest "
                "of the deployment is served meanwhile",
            )
        )
    pods = pods_per_replica(spec)
    if pods > 1 and await _no_api(kube, LEADER_WORKER_SETS, namespace):
        problems.append(
            Problem(
                "LeaderWorkerSetMissing",
                f"one replica spans {pods} pods ({ranks_of(spec)} ranks, resources.gpus "
                f"{spec['resources']['gpus']} each), which runs as a LeaderWorkerSet, but the "
                f"cluster has no LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1): install "
                f"it ({LWS_INSTALL}); nothing is created until it is there",
            )
        )
    if spec.get("autoscaling") is not None:
        problems.extend(await autoscaler_conflicts(kube, namespace, name))
    return problems


async def autoscaler_conflicts(kube: Kube, namespace: str, name: str) -> list[Problem]:
    """HorizontalPodAutoscalers that scale this LLMDeployment too (two controllers
    writing spec.replicas would fight)."""
    listed = await kube.get(AUTOSCALERS.format(namespace=namespace))
    names = [
        hpa["metadata"]["name"]
        for hpa in (listed or {}).get("items", [])
        if (hpa.get("spec") or {}).get("scaleTargetRef", {}).get("kind") == "LLMDeployment"
        and hpa["spec"]["scaleTargetRef"].get("name") == name
    ]
    return [
        Problem(
            "AutoscalerConflict",
            f"HorizontalPodAutoscaler {n!r} {CONFLICT_WORDS}, which sets spec.autoscaling: "
            f"delete the HPA (kubectl delete hpa {n} -n {namespace}) or remove "
            "spec.autoscaling (until then the operator's autoscaler leaves spec.replicas alone)",
        )
        for n in names
    ]


async def _no_api(kube: Kube, collection: str, namespace: str) -> bool:
    """Whether listing the collection is a 404 (no such resource: its CRD is missing)."""
    return await kube.get(collection.format(namespace=namespace) + "?limit=1") is None


def blocking(problems: list[Problem]) -> list[Problem]:
    """The problems that stop the operator from converging (all but PARTIAL_REASONS)."""
    return [p for p in problems if p.reason not in PARTIAL_REASONS]


async def find_problems(
    kube: Kube, namespace: str, name: str, spec: dict[str, Any]
) -> list[Problem]:
    """The spec's own problems, and unless they block (cluster checks cost API calls)
    the cluster's."""
    problems = static_problems(spec)
    if blocking(problems):
        return problems
    return problems + await cluster_problems(kube, namespace, name, spec)

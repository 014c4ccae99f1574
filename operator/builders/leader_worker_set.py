"""The LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) that runs an LLMDeployment whose
replica's ranks outnumber a pod's GPUs: each replica a group of `pods_per_replica` pods,
its leader `kubellm serve --node-rank 0` (the API, probes, the Services' endpoint) and
its workers `--headless`, wired to each other from the variables LWS sets in them."""

from __future__ import annotations

from typing import Any

from kubellm.operator.builders.deployment import (
    LEADER,
    WORKER,
    pod_template,
    pods_per_replica,
    rollout,
)
from kubellm.operator.naming import child_metadata

API_VERSION = "leaderworkerset.x-k8s.io/v1"


def build_leader_worker_set(cr: dict[str, Any], spec: dict[str, Any], image: str) -> dict[str, Any]:
    name = cr["metadata"]["name"]
    return {
        "apiVersion": API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": child_metadata(cr),
        "spec": {
            "replicas": spec["replicas"],
            "startupPolicy": "LeaderCreated",  # the workers wait for the leader themselves
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": rollout(spec),
            },
            "leaderWorkerTemplate": {
                "size": pods_per_replica(spec),
                # one lost pod is a lost replica: recreate the whole group
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": pod_template(name, spec, image, LEADER),
                "workerTemplate": pod_template(name, spec, image, WORKER),
            },
        },
    }

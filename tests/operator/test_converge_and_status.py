"""The pure parts of the handlers: minimal patches, and status with its conditions."""

from __future__ import annotations

import pytest

from kubellm.operator.converge import claim_growth, matches, merge_patch
from kubellm.operator.defaults import with_defaults
from kubellm.operator.problems import Problem, blocking, static_problems
from kubellm.operator.quantity import parse_quantity
from kubellm.operator.status import compute_status, status_patch, transitions
from tests.operator.manifests import custom_resource


def test_what_the_api_server_adds_does_not_count_as_a_difference():
    desired = {"spec": {"containers": [{"name": "runtime", "image": "a"}], "replicas": 1}}
    current = {
        "spec": {
            "containers": [{"name": "runtime", "image": "a", "imagePullPolicy": "IfNotPresent"}],
            "replicas": 1,
            "revisionHistoryLimit": 10,
        },
        "status": {"x": 1},
    }
    assert matches(desired, current) and merge_patch(current, desired) == {}


def test_a_replicas_change_patches_only_replicas():
    current = {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "r"}]}}}}
    desired = {"spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "r"}]}}}}
    assert merge_patch(current, desired) == {"spec": {"replicas": 3}}


def test_lists_are_replaced_whole_and_owned_maps_lose_dropped_keys():
    current = {"env": [{"name": "A"}, {"name": "B"}], "nodeSelector": {"gpu": "a", "zone": "x"}}
    desired = {"env": [{"name": "A"}], "nodeSelector": {"gpu": "a"}}
    assert merge_patch(current, desired) == {"env": [{"name": "A"}], "nodeSelector": {"zone": None}}
    assert merge_patch({"affinity": {"x": 1}}, {}) == {"affinity": None}


READY_ROUTER = {"status": {"replicas": 1, "readyReplicas": 1}}


def _status(deployment_status, cr=None, problems=(), timestamp="T1", router=READY_ROUTER, **spec):
    cr = cr or custom_resource(**spec)
    deployment = None if deployment_status is None else {"status": deployment_status}
    spec = with_defaults(cr["spec"])
    return compute_status(cr, spec, "Deployment", deployment, list(problems), timestamp, router)


def _conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_quantities_compare_as_numbers():
    assert parse_quantity("1Ki") == 1024 and parse_quantity("1.5Gi") == 1536 * 2**20
    assert parse_quantity("500M") == 500 * 10**6 and parse_quantity("1e3") == 1000
    assert parse_quantity("100m") * 10 == 1
    assert parse_quantity("1536Mi") == parse_quantity("1.5Gi") < parse_quantity("2G")
    for bad in ("", "Gi", "10 GB", "ten", "1.2.3Gi"):
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            parse_quantity(bad)


def test_a_claim_only_grows_and_only_its_size_is_patched():
    def claim(size: str, mode: str = "ReadWriteOnce") -> dict:
        return {"spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}}}

    grow = {"spec": {"resources": {"requests": {"storage": "100Gi"}}}}
    assert claim_growth(claim("50Gi"), claim("100Gi", "ReadWriteMany")) == grow
    assert claim_growth(claim("1536Mi"), claim("1.5Gi")) == {}  # the same size, spelt anew
    assert claim_growth(claim("100Gi"), claim("50Gi")) == {}


def test_conditions_follow_the_deployment():
    assert _conditions(_status(None))["Progressing"] == ("True", "Creating")
    starting = _conditions(_status({"replicas": 2, "updatedReplicas": 2}, replicas=2))
    assert starting["Ready"] == ("False", "ReplicasNotReady")
    assert starting["Progressing"] == ("True", "Starting")
    partial = _status({"replicas": 2, "updatedReplicas": 2, "readyReplicas": 1}, replicas=2)
    assert _conditions(partial)["Ready"] == ("True", "PartiallyReady")
    done = _conditions(
        _status({"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}, replicas=2)
    )
    assert done == {
        "Ready": ("True", "AllReplicasReady"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("False", "AsExpected"),
    }
    assert _conditions(_status({}, replicas=0))["Ready"] == ("False", "ScaledToZero")


def test_a_routed_endpoint_is_ready_only_with_a_ready_router():
    replicas = {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2}
    waiting = _status(replicas, replicas=2, router={"status": {"replicas": 2}})
    ready = next(c for c in waiting["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RouterNotReady")
    assert ready["message"] == "2/2 replicas ready; router 0/2 ready"
    assert waiting["router"] == {"policy": "prefix", "replicas": 2, "readyReplicas": 0}
    up = _status(replicas, replicas=2, router={"status": {"replicas": 2, "readyReplicas": 1}})
    assert _conditions(up)["Ready"] == ("True", "AllReplicasReady")
    direct = _status(replicas, replicas=2, router=None, routing={"policy": "none"})
    assert "router" not in direct and _conditions(direct)["Ready"][0] == "True"


def test_a_stuck_rollout_or_a_problem_is_degraded():
    stuck = {
        "conditions": [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "slow",
            }
        ]
    }
    assert _conditions(_status(stuck))["Degraded"] == ("True", "ProgressDeadlineExceeded")
    problem = Problem("SecretNotFound", "Secret 'hf' not found")
    status = _status(None, problems=[problem])
    assert _conditions(status)["Degraded"] == ("True", "SecretNotFound")
    assert "Secret 'hf' not found" in next(
        c["message"] for c in status["conditions"] if c["type"] == "Ready"
    )


def test_transition_times_move_only_when_a_status_changes():
    first = _status({"replicas": 1, "updatedReplicas": 1}, timestamp="T1")
    cr = custom_resource()
    cr["status"] = first
    again = _status({"replicas": 1, "updatedReplicas": 1}, cr=cr, timestamp="T2")
    assert [c["lastTransitionTime"] for c in again["conditions"]] == ["T1"] * 3
    assert transitions(first, again) == []
    ready = _status(
        {"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1}, cr=cr, timestamp="T3"
    )
    changed = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert changed == {"Ready": "T3", "Progressing": "T3", "Degraded": "T1"}
    assert [c["type"] for c in transitions(first, ready)] == ["Ready", "Progressing"]


def test_replicas_sharing_a_read_write_once_cache_are_told_why_they_wait():
    status = _status(
        {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 1},
        model={"source": "hf://org/m"},
        replicas=2,
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "ReadWriteOnce" in ready["message"]


def test_static_problems():
    assert static_problems(with_defaults({})) == []
    spec = with_defaults({"resources": {"gpus": 2}})
    assert [p.reason for p in static_problems(spec)] == ["GPUsUnused"]
    spec = with_defaults({"resources": {"gpus": 2}, "engine": {"tensorParallelSize": 2}})
    assert static_problems(spec) == []
    # what CEL refuses, for API servers that do not enforce it
    spec = with_defaults({"resources": {"gpus": 0}, "engine": {"tensorParallelSize": 4}})
    (problem,) = static_problems(spec)
    assert problem.reason == "TooFewGPUs" and "set resources.gpus to 4" in problem.message
    staged = {"tensorParallelSize": 2, "pipelineParallelSize": 4}
    (problem,) = static_problems(with_defaults({"resources": {"gpus": 3}, "engine": staged}))
    assert problem.reason == "RanksDoNotDivide"
    assert "pipelineParallelSize 4 is 8 ranks" in problem.message
    assert "8 does not divide by 3" in problem.message and "(such as 2)" in problem.message


def test_a_replica_over_several_pods_needs_a_cache_every_node_can_mount():
    engine = {"tensorParallelSize": 8, "pipelineParallelSize": 2}
    hub = {"source": "hf://meta-llama/Llama-3.1-405B-Instruct"}
    spec = with_defaults({"resources": {"gpus": 8}, "engine": engine, "model": hub})
    (problem,) = static_problems(spec)
    assert problem.reason == "CacheNotShareable" and "spans 2 pods" in problem.message
    assert "cache.accessMode to ReadWriteMany" in problem.message
    for cache in ({"accessMode": "ReadWriteMany"}, {"enabled": False}):
        spec = with_defaults(
            {"resources": {"gpus": 8}, "engine": engine, "model": hub, "cache": cache}
        )
        assert static_problems(spec) == []
    builtin = with_defaults({"resources": {"gpus": 8}, "engine": engine})
    assert static_problems(builtin) == []  # nothing downloaded, no claim


def test_bad_autoscaling_is_one_partial_problem_naming_what_to_set():
    """What the schema and CEL refuse, for API servers that do not enforce them: the
    autoscaler stands aside, everything else converges."""
    inverted = with_defaults({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}})
    (problem,) = static_problems(inverted)
    assert problem.reason == "InvalidAutoscaling" and not blocking([problem])
    assert "minReplicas between 0 and maxReplicas" in problem.message
    unrouted = with_defaults(
        {"routing": {"policy": "none"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}}
    )
    (problem,) = static_problems(unrouted)
    assert "set routing.policy to prefix" in problem.message
    zero_target = with_defaults({"autoscaling": {"maxReplicas": 2, "targetRequests": 0}})
    assert "targetRequests must be 1 or more" in static_problems(zero_target)[0].message
    fine = with_defaults({"routing": {"policy": "none"}, "autoscaling": {"maxReplicas": 2}})
    assert static_problems(fine) == []  # minReplicas defaults to 1: no router needed


def test_an_autoscaled_resource_at_zero_is_ready_once_a_router_can_hold_requests():
    autoscaling = {"minReplicas": 0, "maxReplicas": 2}
    idle = _status({}, replicas=0, autoscaling=autoscaling)
    assert _conditions(idle)["Ready"] == ("True", "ScaledToZero")
    no_router = _status({}, replicas=0, autoscaling=autoscaling, router={"status": {}})
    assert _conditions(no_router)["Ready"] == ("False", "ScaledToZero")


def test_status_autoscaling_is_kept_while_autoscaled_and_removed_after():
    cr = custom_resource(autoscaling={"maxReplicas": 2})
    saved = {"desiredReplicas": 1, "reason": "Steady", "window": []}
    cr["status"] = {"autoscaling": saved}
    kept = _status({}, cr=cr)
    assert kept["autoscaling"] == saved and "autoscaling" not in status_patch(cr["status"], kept)
    del cr["spec"]["autoscaling"]
    assert status_patch(cr["status"], _status({}, cr=cr))["autoscaling"] is None

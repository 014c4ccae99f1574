"""The routing decision, a pure function: no sockets."""

from __future__ import annotations

import math
from collections import Counter

from kubellm.router.policy import LOAD_FACTOR, MIN_LOAD_BOUND, choose, load_bound
from kubellm.router.prefix import prefix_key

REPLICAS = [f"http://10.0.0.{i}:8000" for i in range(1, 4)]
IDLE = dict.fromkeys(REPLICAS, 0.0)


def _key(tenant: int, user: int = 0, turn: int = 0) -> bytes:
    system = f"You are tenant {tenant}'s assistant. " + "Policy text. " * 200
    messages = [{"role": "system", "content": system}]
    for t in range(turn + 1):
        messages += [
            {"role": "user", "content": f"user {user} question {t}"},
            {"role": "assistant", "content": f"answer {t}"},
        ]
    return prefix_key("/v1/chat/completions", {"model": "m", "messages": messages})


def test_a_prefix_stays_on_one_replica_and_two_routers_decide_alike():
    for tenant in range(20):
        picks = {
            choose("prefix", _key(tenant, user, turn), dict(IDLE)).replica
            for user in range(5)
            for turn in range(4)
        }
        assert len(picks) == 1, tenant  # every user and turn of a tenant: one replica
    assert choose("prefix", _key(3), dict(IDLE)) == choose("prefix", _key(3), dict(IDLE))


def test_prefixes_spread_over_the_replicas():
    owners = Counter(choose("prefix", _key(t), dict(IDLE)).replica for t in range(300))
    assert set(owners) == set(REPLICAS) and min(owners.values()) > 60, owners


def test_a_busy_owner_spills_within_the_bound_and_says_so():
    owner = choose("prefix", _key(7), dict(IDLE)).replica
    loads = {**IDLE, owner: 6.0}  # bound: 5 (2 x 7/3 rounds up), never under 4
    decision = choose("prefix", _key(7), loads)
    assert decision.replica != owner and decision.reason == "spilled"
    assert loads[decision.replica] + 1 <= load_bound(loads)
    evenly = dict.fromkeys(REPLICAS, 3.0)  # bound ceil(2 x 10 / 3) = 7: room for one more
    assert choose("prefix", _key(7), evenly) == choose("prefix", _key(7), dict(IDLE))
    assert choose("prefix", _key(7), evenly).reason == "prefix-hit"
    assert load_bound({"a": 3.0, "b": 3.0}) == math.ceil(LOAD_FACTOR * 7 / 2)
    assert load_bound({"a": 3.0, "b": 3.0}, 1.25) == 5
    assert load_bound({"a": 1.0, "b": 0.0}) == MIN_LOAD_BOUND  # light load: no spill


def test_a_larger_load_factor_lets_a_busy_owner_keep_its_prefixes():
    owner = choose("prefix", _key(7), dict(IDLE)).replica
    loads = {**dict.fromkeys(REPLICAS, 4.0), owner: 7.0}  # mean with it 16/3
    spilled = choose("prefix", _key(7), loads, load_factor=1.25)  # 8 > ceil(1.25 x 16/3)
    assert spilled.reason == "spilled"
    kept = choose("prefix", _key(7), loads, load_factor=1.5)  # bound ceil(8.0) = 8
    assert kept.replica == owner and kept.reason == "prefix-hit"


def test_losing_a_replica_moves_only_the_prefixes_it_held():
    before = {t: choose("prefix", _key(t), dict(IDLE)).replica for t in range(200)}
    gone = REPLICAS[0]
    after = {
        t: choose("prefix", _key(t), {r: 0.0 for r in REPLICAS if r != gone}).replica
        for t in range(200)
    }
    moved = {t for t in before if before[t] != after[t]}
    assert moved == {t for t in before if before[t] == gone}


def test_least_load_round_robin_and_requests_without_a_prompt():
    loads = {REPLICAS[0]: 4.0, REPLICAS[1]: 1.5, REPLICAS[2]: 2.0}
    assert choose("least-load", _key(1), loads).replica == REPLICAS[1]
    turns = [choose("round-robin", _key(1), loads, turn).replica for turn in range(6)]
    assert turns == sorted(REPLICAS) * 2
    assert choose("prefix", None, loads) == choose("least-load", None, loads).__class__(
        REPLICAS[1], "no-affinity"
    )


def test_the_key_is_the_prompt_as_the_model_sees_it():
    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
    }
    assert prefix_key("/v1/chat/completions", chat) == b"m\nsystem\nBe brief.\nuser\nHi\n"
    assert prefix_key("/v1/completions", {"model": "m", "prompt": "x" * 5000}) == (
        b"m\n" + b"x" * 1000
    )
    assert prefix_key("/v1/completions", {"model": "m", "prompt": [[1, 2], [3]]}) == b"m\n[1, 2]"
    assert prefix_key("/v1/models", None) is None

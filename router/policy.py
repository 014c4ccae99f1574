"""Which replica takes a request: a pure function of the request's prefix key, the
replica set and the replicas' loads, so two routers with the same view decide alike.

`prefix` is consistent hashing with bounded loads (CHWBL, as KubeAI's PrefixHash): each
replica owns VIRTUAL_NODES points on a hash ring; a request goes to the first replica
clockwise from its key's hash whose load, with this request, stays within
LOAD_FACTOR times the mean (or MIN_LOAD_BOUND). Requests that share a prefix so land on
one replica (whose prefix cache holds it) until that replica is busier than the rest,
and a replica that joins or leaves moves only the keys next to its points. `least-load`
takes the least loaded replica; `round-robin` takes them in turn.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from dataclasses import dataclass

POLICIES = ("prefix", "least-load", "round-robin")
VIRTUAL_NODES = 256  # KubeAI's replication
# KubeAI's meanLoadFactor is 1.25. Under overload a replica that owns more prefixes also
# queues longer, so its in-flight count outgrows its share of requests, and at 1.25 its
# prefixes kept moving to replicas that prefilled them cold: measured on four placements
# (BENCHMARKS.md, "A fleet"), 2 spilled less than half as often (30 against 70 of 216
# requests) and met the targets in three placements against two.
LOAD_FACTOR = 2.0
# Below this many requests a replica is never too busy for its prefixes: a continuous
# batching engine runs a few requests a step for little more than one, while a prefix
# sent elsewhere is prefilled again. (KubeAI's bound alone, at light load, spills the
# second concurrent request of a tenant: the mean is then below one.)
MIN_LOAD_BOUND = 4


@dataclass(frozen=True)
class Decision:
    replica: str
    reason: str  # prefix-hit | spilled | no-affinity | least-load | round-robin


def _hash(text: bytes) -> int:
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


@functools.lru_cache(maxsize=16)
def ring(replicas: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The hash ring of a replica set: sorted points and the replica owning each."""
    points = sorted((_hash(f"{r}#{i}".encode()), r) for r in replicas for i in range(VIRTUAL_NODES))
    return tuple(p for p, _ in points), tuple(r for _, r in points)


def load_bound(loads: dict[str, float], factor: float = LOAD_FACTOR) -> float:
    """The most load a replica may carry, this request included: `factor` x the mean
    (rounded up), and never less than MIN_LOAD_BOUND."""
    return max(MIN_LOAD_BOUND, math.ceil(factor * (sum(loads.values()) + 1) / len(loads)))


def choose(
    policy: str,
    key: bytes | None,
    loads: dict[str, float],
    turn: int = 0,
    load_factor: float = LOAD_FACTOR,
) -> Decision:
    """The replica for a request. `loads`: every ready replica's load (in-flight and
    queued requests); `key`: the request's prefix key (None: none); `turn`: the
    router's request counter, for round-robin; `load_factor`: the bound, in means."""
    replicas = tuple(sorted(loads))
    if policy == "round-robin":
        return Decision(replicas[turn % len(replicas)], "round-robin")
    least = min(replicas, key=lambda r: (loads[r], r))
    if policy == "least-load":
        return Decision(least, "least-load")
    if key is None:
        return Decision(least, "no-affinity")
    points, owners = ring(replicas)
    bound, seen = load_bound(loads, load_factor), set()
    start = bisect.bisect(points, _hash(key))
    for step in range(len(points)):
        replica = owners[(start + step) % len(points)]
        if replica in seen:
            continue
        if loads[replica] + 1 <= bound:
            return Decision(replica, "prefix-hit" if not seen else "spilled")
        seen.add(replica)
    return Decision(least, "spilled")  # unreachable: the least loaded is within the bound

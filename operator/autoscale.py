"""How many replicas an autoscaled LLMDeployment wants: a pure function of its load, its
bounds, and the recommendations of the last `scaleDownDelaySeconds` (kept in status, so
an operator that restarts resumes mid-delay instead of starting the delay again).

Up at once; down only to the highest recommendation of the whole delay, so the count
drops only after the load has stayed lower for that long, and a burst moves it at most
once up and once down (Kubernetes' HPA stabilises its scale-down the same way). A load
that could not be read is not zero load: it never lowers the count. A request held by a
router while no replica is ready asks for one even from zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bounds:
    min_replicas: int
    max_replicas: int
    target_requests: float  # in-flight plus waiting requests per replica
    scale_down_delay: float  # seconds

    @classmethod
    def from_spec(cls, autoscaling: dict[str, Any]) -> Bounds:
        return cls(
            autoscaling["minReplicas"],
            autoscaling["maxReplicas"],
            float(autoscaling["targetRequests"]),
            float(autoscaling["scaleDownDelaySeconds"]),
        )


# (time, recommendation) pairs, each higher than every later one: the sliding maximum of
# the recommendations within the delay, at most one entry per replica count.
Window = tuple[tuple[float, int], ...]


@dataclass(frozen=True)
class Decision:
    desired: int
    recommended: int | None  # from this load alone (None: the load was not read)
    reason: str  # ScaledUp | ScaledDown | WaitingToScaleDown | Steady | MetricsMissing
    window: Window


def recommend(bounds: Bounds, load: float, held: int) -> int:
    """ceil(load / targetRequests) within the bounds; at least one while a request waits."""
    wanted = math.ceil(load / bounds.target_requests - 1e-9)
    return clamp(bounds, max(wanted, 1) if held > 0 else wanted)


def clamp(bounds: Bounds, replicas: int) -> int:
    return min(bounds.max_replicas, max(bounds.min_replicas, replicas))


def decide(
    bounds: Bounds, current: int, load: float | None, held: int, window: Window | None, now: float
) -> Decision:
    """`current`: the replicas the resource asks for now; `load`: in-flight plus waiting
    requests over its routers and replicas (None: a source did not answer); `held`:
    requests its routers hold for want of a ready replica; `window`: the last decision's
    (None after a restart that lost it: the delay starts again from `current`)."""
    window = _within(window if window is not None else ((now, current),), bounds, now)
    if load is None:
        wanted = clamp(bounds, max(current, 1 if held > 0 else 0))
        return Decision(wanted, None, "MetricsMissing", _push(window, now, wanted))
    recommended = recommend(bounds, load, held)
    window = _push(window, now, recommended)
    if recommended > current:
        return Decision(recommended, recommended, "ScaledUp", window)
    desired = clamp(bounds, min(current, max(value for _, value in window)))
    if desired < current:
        return Decision(desired, recommended, "ScaledDown", window)
    reason = "WaitingToScaleDown" if recommended < current else "Steady"
    return Decision(current, recommended, reason, window)


def _within(window: Window, bounds: Bounds, now: float) -> Window:
    """The entries still inside the delay."""
    return tuple((t, v) for t, v in window if now - t < bounds.scale_down_delay)


def _push(window: Window, now: float, value: int) -> Window:
    """Add a recommendation, dropping the earlier ones it equals or outweighs (they can
    no longer be the window's maximum)."""
    return (*((t, v) for t, v in window if v > value), (now, value))


def window_from_status(saved: Any) -> Window | None:
    """status.autoscaling.window as written by `window_to_status`; None if absent or
    malformed (then the delay starts again: never a scale-down on lost history)."""
    if not isinstance(saved, list):
        return None
    try:
        return tuple((float(entry["time"]), int(entry["replicas"])) for entry in saved)
    except (KeyError, TypeError, ValueError):
        return None


def window_to_status(window: Window) -> list[dict[str, Any]]:
    return [{"time": t, "replicas": v} for t, v in window]

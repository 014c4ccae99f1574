"""The autoscaler's decision, a pure function of load, bounds and the delay's window."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from kubellm.operator.autoscale import (
    Bounds,
    decide,
    recommend,
    window_from_status,
    window_to_status,
)

BOUNDS = Bounds(min_replicas=0, max_replicas=4, target_requests=2, scale_down_delay=60)


def _run(samples, current=1, bounds=BOUNDS, window=None):
    """Decide at each (time, load, held); the replica counts decided, in order."""
    counts = []
    for now, load, held in samples:
        decision = decide(bounds, current, load, held, window, now)
        current, window = decision.desired, decision.window
        counts.append(current)
    return counts, window


def test_up_at_once_and_down_only_after_the_delay():
    counts, _ = _run([(0, 7.0, 0), (10, 1.0, 0), (59, 1.0, 0), (61, 1.0, 0)])
    assert counts == [4, 4, 4, 1]  # ceil(7 / 2) = 4 at once; 1 once 60 s of low load passed
    counts, _ = _run([(0, 9.0, 0), (30, 5.0, 0), (50, 1.0, 0), (61, 1.0, 0), (111, 1.0, 0)])
    assert counts == [4, 4, 4, 3, 1]  # down to the highest of the last 60 s: 3 (t=30), then 1


def test_a_burst_moves_the_count_once_up_and_once_down():
    steady = [(t, 2.0, 0) for t in range(0, 300, 5)]
    bursts = [(t, 8.0 if t in (100, 130, 150) else 2.0, 0) for t, _, _ in steady]
    counts, _ = _run(bursts)
    changes = [b for a, b in itertools.pairwise(counts) if a != b]
    assert changes == [4, 1]  # up at the first burst; down 60 s after the last, never between


def test_missing_metrics_never_scale_down():
    counts, window = _run([(0, 6.0, 0)] + [(t, None, 0) for t in range(10, 400, 10)])
    assert set(counts) == {3}
    counts, _ = _run([(400, 0.0, 0), (445, 0.0, 0), (451, 0.0, 0)], current=3, window=window)
    assert counts == [3, 3, 0]  # the delay counts from the last sample that was not read


def test_a_held_request_asks_for_a_replica_even_from_zero():
    assert decide(BOUNDS, 0, 0.0, 1, None, 0).desired == 1
    assert decide(BOUNDS, 0, None, 1, None, 0).desired == 1  # a router answered, a pod did not
    assert decide(BOUNDS, 0, 0.0, 0, None, 0).desired == 0
    assert recommend(BOUNDS, 4.0, 0) == 2 and recommend(BOUNDS, 4.1, 0) == 3


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 3).flatmap(lambda low: st.tuples(st.just(low), st.integers(max(low, 1), 6))),
    st.lists(
        st.tuples(st.integers(1, 40), st.one_of(st.none(), st.floats(0, 50)), st.integers(0, 2)),
        max_size=40,
    ),
)
def test_the_count_stays_within_the_bounds_and_never_drops_early(limits, steps):
    bounds = Bounds(limits[0], limits[1], target_requests=3, scale_down_delay=30)
    now, current, window, highs = 0.0, limits[0], None, []
    for gap, load, held in steps:
        now += gap
        decision = decide(bounds, current, load, held, window, now)
        assert bounds.min_replicas <= decision.desired <= bounds.max_replicas
        if decision.desired < current:  # nothing within the delay asked for more
            assert all(v <= decision.desired for t, v in highs if now - t < 30)
        highs.append((now, decision.recommended if load is not None else decision.desired))
        current, window = decision.desired, decision.window


def test_an_operator_restart_mid_delay_resumes_the_delay_from_status():
    samples = [(0, 8.0, 0), (20, 1.0, 0), (40, 1.0, 0), (61, 1.0, 0)]
    straight, _ = _run(samples)
    before, window = _run(samples[:2])
    saved = json.loads(json.dumps({"window": window_to_status(window)}))  # through status
    after, _ = _run(samples[2:], current=before[-1], window=window_from_status(saved["window"]))
    assert before + after == straight == [4, 4, 4, 1]
    lost, _ = _run(samples[2:], current=4, window=window_from_status(None))
    assert lost == [4, 4]  # history lost: the delay starts again, never an early drop
    assert window_from_status([{"time": "x"}]) is None

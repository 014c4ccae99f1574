"""Property tests of the scheduler and KV cache over random workloads.

The model's output is replaced by tokens drawn from a seeded RNG (the scheduler
only sees token ids); everything else is the real scheduler and cache manager.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kubellm.runtime.core.kv_cache import KVCacheManager
from kubellm.runtime.core.sampling_params import SamplingParams
from kubellm.runtime.core.scheduler import Scheduler
from kubellm.runtime.core.sequence import Sequence, SequenceStatus

from .invariants import check_all_free, check_kv_consistent

MAX_MODEL_LEN = 64
EOS = 0

workload = st.fixed_dictionaries(
    {
        "requests": st.lists(
            st.tuples(
                st.integers(1, 48),  # prompt length
                st.integers(1, 16),  # max_tokens
                st.integers(0, 6),  # arrival step
                st.one_of(st.none(), st.integers(0, 20)),  # abort at step
                st.integers(0, 2),  # prompt family (shared prefixes)
            ),
            min_size=1,
            max_size=12,
        ),
        "block_size": st.sampled_from([1, 4, 16]),
        "extra_blocks": st.integers(0, 40),
        "budget": st.integers(1, 80),
        "max_num_seqs": st.integers(1, 8),
        "prefix_caching": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@settings(max_examples=150, deadline=None)
@given(workload)
def test_random_workloads_keep_the_cache_consistent_and_finish(w):
    rng = random.Random(w["seed"])
    bs = w["block_size"]
    num_blocks = -(-MAX_MODEL_LEN // bs) + w["extra_blocks"]
    kv = KVCacheManager(num_blocks, bs, w["prefix_caching"])
    scheduler = Scheduler(kv, w["max_num_seqs"], w["budget"])
    requests = []
    for i, (length, max_tokens, arrival, abort_at, family) in enumerate(w["requests"]):
        prompt = [1 + family] * (length // 2) + [
            rng.randrange(1, 50) for _ in range(length - length // 2)
        ]
        params = SamplingParams(max_tokens=max_tokens)
        requests.append(
            (Sequence(f"r{i}", prompt, params, frozenset([EOS]), MAX_MODEL_LEN), arrival, abort_at)
        )

    for step in range(2000):
        for request, arrival, abort_at in requests:
            if arrival == step:
                scheduler.add(request)
            if abort_at == step and arrival <= step:
                scheduler.abort(request)
        out = scheduler.schedule()
        assert out.num_tokens <= w["budget"]
        assert len(scheduler.running) <= w["max_num_seqs"]
        assert all(s.num_new_tokens >= 1 for s in out.scheduled)
        check_kv_consistent(kv, scheduler)
        sampled = {
            s.sequence.sequence_id: rng.choice([EOS, 7, 8, 9]) for s in out.scheduled if s.samples
        }
        advanced = scheduler.update(out, sampled)
        scheduler.remove_finished(advanced)
        check_kv_consistent(kv, scheduler)
        if step > 6 and not scheduler.has_unfinished():
            break
    assert not scheduler.has_unfinished(), "requests left unfinished"
    for request, _, _ in requests:
        assert request.status is SequenceStatus.FINISHED
        assert request.finish_reason in ("stop", "length", "abort")
        if request.finish_reason != "abort":
            assert 1 <= request.num_output_tokens <= request.params.max_tokens
    check_all_free(kv)


def test_preemption_takes_the_most_recently_admitted_request():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64)
    old = Sequence("old", list(range(1, 9)), SamplingParams(max_tokens=16), frozenset(), 64)
    new = Sequence("new", list(range(1, 9)), SamplingParams(max_tokens=16), frozenset(), 64)
    scheduler.add(old)
    scheduler.add(new)
    out = scheduler.schedule()  # both prefills fit: 2 blocks each
    assert [s.sequence.sequence_id for s in out.scheduled] == ["old", "new"]
    scheduler.update(out, {"old": 5, "new": 5})  # 9 tokens each: the 9th needs a 3rd block
    out = scheduler.schedule()  # each decode needs a third block; only one can get it
    assert [r.sequence_id for r in out.preempted] == ["new"]
    assert [s.sequence.sequence_id for s in out.scheduled] == ["old"]
    assert new.status is SequenceStatus.PREEMPTED and scheduler.waiting[0] is new
    assert new.num_computed_tokens == 0 and new.block_ids == []

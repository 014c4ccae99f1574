"""The KV cache manager on its own: allocation, sharing, prefix caching, LRU eviction."""

from __future__ import annotations

import pytest

from kubellm.runtime.core.kv_cache import KVCacheManager
from kubellm.runtime.core.sampling_params import SamplingParams
from kubellm.runtime.core.sequence import Sequence


def make_request(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(max_tokens=8), frozenset(), 1024)


def admit(kv: KVCacheManager, request: Sequence) -> int:
    """Admit like the scheduler does and 'compute' the whole prompt; return cached tokens."""
    cached = kv.find_cached_prefix(request)
    num_cached = len(cached) * kv.block_size
    assert kv.allocate_slots(request, request.num_tokens - num_cached, cached)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return num_cached


def test_allocation_rounds_up_to_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    request = make_request("a", list(range(10)))
    assert kv.allocate_slots(request, 10)
    assert len(request.block_ids) == 3 and kv.num_free_blocks == 5
    kv.free(request)
    assert kv.num_free_blocks == 8 and all(b.ref_count == 0 for b in kv.blocks)


def test_allocation_fails_without_side_effects_when_the_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    request = make_request("a", list(range(12)))
    assert not kv.allocate_slots(request, 12)
    assert request.block_ids == [] and kv.num_free_blocks == 2


def test_shared_prefix_is_reused_and_reference_counted():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = make_request("a", list(range(10)))
    second = make_request("b", [*range(8), 99, 98, 97])
    assert admit(kv, first) == 0
    assert admit(kv, second) == 8
    assert second.block_ids[:2] == first.block_ids[:2]
    assert [kv.blocks[b].ref_count for b in first.block_ids[:2]] == [2, 2]
    kv.free(first)
    assert [kv.blocks[b].ref_count for b in second.block_ids[:2]] == [1, 1]


def test_last_token_is_never_served_from_cache():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    admit(kv, make_request("a", list(range(8))))
    # Identical 8-token prompt: block 2 is cached too, but its last token must be computed.
    assert admit(kv, make_request("b", list(range(8)))) == 4


def test_freed_cached_blocks_are_revived_then_evicted_oldest_first():
    kv = KVCacheManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    first = make_request("a", list(range(9)))
    admit(kv, first)
    kv.free(first)
    assert kv.num_free_blocks == 5 and len(kv.cached_blocks) == 2
    assert admit(kv, make_request("b", list(range(9)))) == 8  # revived from the free list
    other = make_request("c", [50 + i for i in range(5)])
    assert admit(kv, other) == 0
    assert len(kv.cached_blocks) == 3  # b's two blocks and c's first; no eviction needed yet


def test_eviction_drops_the_hash_so_stale_blocks_are_never_hit():
    kv = KVCacheManager(num_blocks=3, block_size=4, enable_prefix_caching=True)
    first = make_request("a", list(range(9)))
    admit(kv, first)
    kv.free(first)
    filler = make_request("f", [70 + i for i in range(12)])
    admit(kv, filler)  # needs all three blocks: both cached ones are evicted
    assert kv.cached_blocks.keys() == {h for h in filler.block_hashes[:3]}
    kv.free(filler)
    assert admit(kv, make_request("b", list(range(9)))) == 0


def test_double_free_is_detected():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    request = make_request("a", list(range(5)))
    kv.allocate_slots(request, 5)
    ids = list(request.block_ids)
    kv.free(request)
    request.block_ids = ids
    with pytest.raises(AssertionError):
        kv.free(request)


def test_a_request_growing_one_block_at_a_time_keeps_consecutive_blocks():
    kv = KVCacheManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    first, second = make_request("a", list(range(8))), make_request("b", list(range(8)))
    assert kv.allocate_slots(first, 8) and kv.allocate_slots(second, 8)
    for step in range(6):  # decodes interleave: each grows by one block in turn
        for request in (first, second):
            request.num_computed_tokens = 8 + 4 * step
            assert kv.allocate_slots(request, 4)
    for request in (first, second):
        ids = request.block_ids
        assert ids == list(range(ids[0], ids[0] + len(ids)))


def test_contiguity_never_evicts_a_cached_block_out_of_lru_order():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    cached = make_request("a", list(range(9)))
    admit(kv, cached)
    kv.free(cached)  # its two full blocks stay cached on the free list
    hashed = set(kv.cached_blocks.values())
    assert len(hashed) == 2
    grower = make_request("b", [90 + i for i in range(3)])
    assert kv.allocate_slots(grower, 3)
    for step in range(3):  # grows to 4 blocks: exactly the uncached free ones
        grower.num_computed_tokens = 3 + 4 * step
        assert kv.allocate_slots(grower, 4)
    assert len(grower.block_ids) == 4
    assert not hashed & set(grower.block_ids)
    assert set(kv.cached_blocks.values()) == hashed

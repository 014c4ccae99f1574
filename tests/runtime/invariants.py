"""Checks of the KV cache's bookkeeping that must hold after every engine step."""

from __future__ import annotations

from collections import Counter

from kubellm.runtime.kv_cache import KVCacheManager
from kubellm.runtime.scheduler import Scheduler


def check_kv_consistent(kv: KVCacheManager, scheduler: Scheduler) -> None:
    live = [*scheduler.running, *scheduler.waiting]
    holders = Counter(b for r in live for b in r.block_ids)
    for request in live:
        assert len(set(request.block_ids)) == len(request.block_ids), "block twice in one table"
    for block in kv.blocks:
        assert block.ref_count >= 0, f"negative ref count on block {block.block_id}"
        assert block.ref_count == holders[block.block_id], f"block {block.block_id} leaked"
    assert set(kv.free_blocks) == {b.block_id for b in kv.blocks if b.ref_count == 0}
    for block_hash, block_id in kv.cached_blocks.items():
        assert kv.blocks[block_id].block_hash == block_hash


def check_all_free(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.num_blocks, "blocks still held after every request ended"
    assert all(b.ref_count == 0 for b in kv.blocks)

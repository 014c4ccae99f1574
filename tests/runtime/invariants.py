"""Checks of the KV cache's bookkeeping that must hold after every engine step, and the
settings the engine's invariants are checked under."""

from __future__ import annotations

import time
from collections import Counter

from kubellm.runtime.core.async_engine import AsyncEngine
from kubellm.runtime.core.kv_cache import KVCacheManager
from kubellm.runtime.core.scheduler import Scheduler

# The suite's fp32 oracle pins, and `make serve`'s defaults (conftest's `model_for`,
# pins.py).
ENGINE_SETTINGS = ("pinned", "defaults")


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


def _is_idle(engine: AsyncEngine) -> bool:
    kv = engine.engine.kv
    return (
        engine.num_in_flight == 0
        and not engine.engine.has_unfinished_requests()
        and kv.num_free_blocks == kv.num_blocks
    )


def assert_server_idle(engine: AsyncEngine, wait_s: float = 20) -> None:
    """Nothing in flight, nothing scheduled, every block free. Closing a stream is applied
    by the step thread between steps, so give it a moment first."""
    deadline = time.monotonic() + wait_s
    while not _is_idle(engine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _is_idle(engine), "the server did not return to idle"
    check_kv_consistent(engine.engine.kv, engine.engine.scheduler)

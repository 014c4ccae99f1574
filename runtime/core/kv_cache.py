"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-sequence block
tables, reference counts, and prefix caching.

A full block is named by a hash of its tokens chained with its parent's hash, so
one hash names the whole prefix up to that block. A block whose last owner is
done goes back to the free list *with* its hash: until it is handed out again
(oldest first: an LRU), a later sequence with the same prefix can reuse it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kubellm.runtime.core.sequence import Sequence
from kubellm.runtime.executor.step_plan import cdiv


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """sha256 of the parent hash and this block's token ids: collisions are not a concern."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class KVCacheManager:
    """Hands out KV blocks to sequences; never touches the KV tensors themselves."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (oldest first); cached ones keep their hash.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def find_cached_prefix(self, sequence: Sequence) -> list[int]:
        """Blocks already holding this sequence's longest cached prefix.

        At least the last token is always left to compute: its logits are needed. A sequence
        that wants its prompt's logprobs computes the whole prompt (cached blocks hold K/V,
        not logits).
        """
        if not self.enable_prefix_caching or sequence.params.prompt_logprobs is not None:
            return []
        self._extend_hashes(sequence, (sequence.num_tokens - 1) // self.block_size)
        hits: list[int] = []
        for block_hash in sequence.block_hashes[: (sequence.num_tokens - 1) // self.block_size]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Count one admitted sequence's prefix-cache lookup, in tokens (as vLLM does)."""
        self.prefix_queries += num_queried
        self.prefix_hits += num_hit

    def allocate_slots(
        self, sequence: Sequence, num_new_tokens: int, cached: list[int] | None = None
    ) -> bool:
        """Give the sequence room for `num_new_tokens` more tokens after what it has computed
        (and after the `cached` prefix blocks, which it takes a reference on).
        Returns False, changing nothing, if the pool cannot.
        """
        cached = cached or []
        held = len(sequence.block_ids) + len(cached)
        total_tokens = sequence.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        needed = cdiv(total_tokens, self.block_size) - held
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if needed > len(self.free_blocks) - revived:
            return False
        for block_id in cached:
            self._share(block_id)
        sequence.block_ids.extend(cached)
        for _ in range(max(needed, 0)):
            sequence.block_ids.append(self._allocate_fresh(sequence.block_ids))
        return True

    def cache_full_blocks(self, sequence: Sequence) -> None:
        """Publish the sequence's newly computed full blocks for reuse by later sequences."""
        if not self.enable_prefix_caching:
            return
        num_full = sequence.num_computed_tokens // self.block_size
        self._extend_hashes(sequence, num_full)
        for index in range(sequence.num_registered_blocks, num_full):
            block = self.blocks[sequence.block_ids[index]]
            block_hash = sequence.block_hashes[index]
            if block.block_hash is None and block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block.block_id
        sequence.num_registered_blocks = max(sequence.num_registered_blocks, num_full)

    def free(self, sequence: Sequence) -> None:
        """Drop the sequence's references; tail blocks go to the free list first, so a
        shared prefix outlives the suffixes that hang off it."""
        for block_id in reversed(sequence.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise AssertionError(f"block {block_id} freed twice")
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        sequence.block_ids = []
        sequence.num_registered_blocks = 0

    def _extend_hashes(self, sequence: Sequence, num_blocks: int) -> None:
        hashes = sequence.block_hashes
        size = self.block_size
        for index in range(len(hashes), num_blocks):
            parent = hashes[-1] if hashes else b""
            hashes.append(hash_block(parent, sequence.token_ids[index * size : (index + 1) * size]))

    def _allocate_fresh(self, table: list[int]) -> int:
        """A free block for the next entry of `table`.

        Contiguous tables let attention read the pool in place instead of gathering
        (see the torch backend), so prefer, in order: the block right after the
        table's last one; for an empty table, the middle of the longest run of free
        blocks that cache nothing (leaving room to grow); otherwise the least
        recently freed block, forgetting what it cached (LRU eviction).
        """
        preferred = table[-1] + 1 if table else self._middle_of_longest_clean_run()
        if preferred is not None and self._is_clean_free(preferred):
            del self.free_blocks[preferred]
            block_id = preferred
        else:
            block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _is_clean_free(self, block_id: int) -> bool:
        return (
            block_id < self.num_blocks
            and block_id in self.free_blocks
            and self.blocks[block_id].block_hash is None
        )

    def _middle_of_longest_clean_run(self) -> int | None:
        """Vectorized: this runs once per new block table, over a pool of up to ~1e5 blocks."""
        free = np.fromiter(self.free_blocks, dtype=np.int64, count=len(self.free_blocks))
        hashed = np.fromiter(self.cached_blocks.values(), dtype=np.int64)
        clean = np.setdiff1d(free, hashed)  # sorted
        if clean.size == 0:
            return None
        breaks = np.flatnonzero(np.diff(clean) != 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.concatenate((breaks, [clean.size])) - starts
        longest = int(np.argmax(lengths))
        return int(clean[starts[longest] + lengths[longest] // 2])

    def _share(self, block_id: int) -> None:
        """Take one more reference on a cached block, reviving it if it was free."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

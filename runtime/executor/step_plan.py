"""A step's plan: everything the model runner needs, fixed when the step is scheduled.

Built on rank 0 from the scheduler's output (`SchedulerOutput.plan`) before the
scheduler updates any sequence, it holds only arrays (no `Sequence`), so the same plan can
be pickled to every tensor-parallel worker and run there unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass
class StepPlan:
    input_ids: np.ndarray  # [tokens] int64, every scheduled request's new tokens in order
    positions: np.ndarray  # [tokens] int64
    slot_mapping: np.ndarray  # [tokens] int64: where each new token's K/V goes
    query_start_loc: np.ndarray  # [requests + 1] int32
    seq_lens: np.ndarray  # [requests] int32: context length after this step
    block_tables: np.ndarray  # [requests, max blocks] int64, padded with 0
    contiguous_starts: list[int]  # per request: its first block when ids are consecutive, else -1
    logits_indices: np.ndarray  # rows whose logits are sampled, one per sampling request
    prompt_indices: np.ndarray  # rows whose logits score the next prompt token

    @property
    def query_lens(self) -> list[int]:
        return np.diff(self.query_start_loc).tolist()

    @classmethod
    def for_profile(cls, num_tokens: int, num_seqs: int, block_size: int) -> tuple[StepPlan, int]:
        """The largest step the scheduler can produce: `num_tokens` prompt tokens over
        min(num_seqs, num_tokens) sequences that each end their prompt and so sample,
        on consecutive blocks from 0; with the number of blocks it needs."""
        count = min(num_seqs, num_tokens)
        lengths = [num_tokens // count + (i < num_tokens % count) for i in range(count)]
        starts = np.cumsum([0] + [cdiv(n, block_size) for n in lengths]).tolist()
        tables = [list(range(a, b)) for a, b in itertools.pairwise(starts)]
        width = max(len(t) for t in tables)
        slots = [t[0] * block_size + np.arange(n) for n, t in zip(lengths, tables)]
        query_start = np.cumsum([0, *lengths])
        plan = cls(
            input_ids=np.zeros(num_tokens, dtype=np.int64),
            positions=np.concatenate([np.arange(n) for n in lengths]).astype(np.int64),
            slot_mapping=np.concatenate(slots).astype(np.int64),
            query_start_loc=query_start.astype(np.int32),
            seq_lens=np.array(lengths, dtype=np.int32),
            block_tables=np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64),
            contiguous_starts=[t[0] for t in tables],
            logits_indices=(query_start[1:] - 1).astype(np.int64),
            prompt_indices=np.zeros(0, dtype=np.int64),
        )
        return plan, starts[-1]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in integers: the blocks `a` tokens take (the one ceiling division)."""
    return -(-a // b)


def contiguous_start(block_ids: list[int]) -> int:
    """The first block id if the ids are consecutive, else -1."""
    first = block_ids[0]
    if block_ids[-1] - first != len(block_ids) - 1:
        return -1
    return first if block_ids == list(range(first, first + len(block_ids))) else -1

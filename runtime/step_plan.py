"""A step's plan: everything the model runner needs, fixed when the step is scheduled.

Built on rank 0 from the scheduler's output before the scheduler updates any request,
it holds only arrays (no `Request`), so the same plan can be pickled to every
tensor-parallel worker and run there unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kubellm.runtime.scheduler import SchedulerOutput


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
    def from_schedule(cls, out: SchedulerOutput, block_size: int) -> StepPlan:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        prompt_indices: list[int] = []
        for item in out.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids += request.token_ids[start:end]
            positions += range(start, end)
            table = request.block_ids
            slots += [
                table[p // block_size] * block_size + p % block_size for p in range(start, end)
            ]
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                logits_indices.append(query_start[-1] - 1)
            first_row = query_start[-2] - start
            prompt_indices += (first_row + p for p in item.prompt_positions)
        max_blocks = max(-(-s // block_size) for s in seq_lens)
        tables = [item.request.block_ids[:max_blocks] for item in out.scheduled]
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        return cls(
            input_ids=np.array(input_ids, dtype=np.int64),
            positions=np.array(positions, dtype=np.int64),
            slot_mapping=np.array(slots, dtype=np.int64),
            query_start_loc=np.array(query_start, dtype=np.int32),
            seq_lens=np.array(seq_lens, dtype=np.int32),
            block_tables=np.array(padded, dtype=np.int64),
            contiguous_starts=[_contiguous_start(t) for t in tables],
            logits_indices=np.array(logits_indices, dtype=np.int64),
            prompt_indices=np.array(prompt_indices, dtype=np.int64),
        )


def _contiguous_start(block_ids: list[int]) -> int:
    """The first block id if the ids are consecutive, else -1."""
    first = block_ids[0]
    if block_ids[-1] - first != len(block_ids) - 1:
        return -1
    return first if block_ids == list(range(first, first + len(block_ids))) else -1

"""Which sequences run each step, and how many tokens each.

One token budget per step (`max_num_batched_tokens`) and a cap on running
sequences (`max_num_seqs`). Running sequences go first, in admission order: one
token each for a decode, or the next chunk of a prefill (chunked prefill); then
waiting sequences, first come first served. When the KV pool runs out, the most
recently admitted running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed (mostly from the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from kubellm.runtime.core.kv_cache import KVCacheManager
from kubellm.runtime.core.sequence import Sequence, SequenceStatus
from kubellm.runtime.executor.step_plan import StepPlan, cdiv, contiguous_start


@dataclass
class ScheduledSequence:
    sequence: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so it samples."""
        return self.sequence.num_computed_tokens + self.num_new_tokens == self.sequence.num_tokens

    @property
    def prompt_positions(self) -> range:
        """Positions whose logits score the next prompt token this step (prompt_logprobs)."""
        if self.sequence.params.prompt_logprobs is None:
            return range(0)
        start = self.sequence.num_computed_tokens
        end = min(start + self.num_new_tokens, len(self.sequence.prompt_token_ids) - 1)
        return range(start, max(start, end))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    def plan(self, block_size: int) -> StepPlan:
        """This step as the arrays the model runner takes."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        prompt_indices: list[int] = []
        for item in self.scheduled:
            sequence, start = item.sequence, item.sequence.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids += sequence.token_ids[start:end]
            positions += range(start, end)
            table = sequence.block_ids
            slots += [
                table[p // block_size] * block_size + p % block_size for p in range(start, end)
            ]
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                logits_indices.append(query_start[-1] - 1)
            first_row = query_start[-2] - start
            prompt_indices += (first_row + p for p in item.prompt_positions)
        max_blocks = max(cdiv(s, block_size) for s in seq_lens)
        tables = [item.sequence.block_ids[:max_blocks] for item in self.scheduled]
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        return StepPlan(
            input_ids=np.array(input_ids, dtype=np.int64),
            positions=np.array(positions, dtype=np.int64),
            slot_mapping=np.array(slots, dtype=np.int64),
            query_start_loc=np.array(query_start, dtype=np.int32),
            seq_lens=np.array(seq_lens, dtype=np.int32),
            block_tables=np.array(padded, dtype=np.int64),
            contiguous_starts=[contiguous_start(t) for t in tables],
            logits_indices=np.array(logits_indices, dtype=np.int64),
            prompt_indices=np.array(prompt_indices, dtype=np.int64),
        )


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # all tokens run through the model, prefill and decode
        # Sequences of batches scheduled but not yet updated (pipeline stages run several
        # at once): never scheduled again, nor preempted, until their batch is back.
        self.in_flight: set[int] = set()

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        self.in_flight.update(id(item.sequence) for item in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            index += 1
            if id(sequence) in self.in_flight:
                continue
            num_new = min(sequence.num_tokens - sequence.num_computed_tokens, budget)
            while not self.kv.allocate_slots(sequence, num_new):
                victim = self._victim()
                if victim is None:  # the others are in flight: wait for their batches
                    return budget
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is sequence:
                    return budget
            out.scheduled.append(ScheduledSequence(sequence, num_new))
            budget -= num_new
        return budget

    def _victim(self) -> Sequence | None:
        """The most recently admitted running sequence not in flight, taken out of
        `running`; None if there is none."""
        for index in range(len(self.running) - 1, -1, -1):
            if id(self.running[index]) not in self.in_flight:
                return self.running.pop(index)
        return None

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            sequence = self.waiting[0]
            if sequence.waits_for_prompt_leader:
                return  # its prompt is in the cache once the leader's prefill is done
            cached = self.kv.find_cached_prefix(sequence)
            num_cached_tokens = len(cached) * self.kv.block_size
            num_new = min(sequence.num_tokens - num_cached_tokens, budget)
            if not self.kv.allocate_slots(sequence, num_new, cached):
                return  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if self.kv.enable_prefix_caching:
                self.kv.record_prefix_lookup(sequence.num_tokens, num_cached_tokens)
            sequence.num_computed_tokens = num_cached_tokens
            if sequence.status is SequenceStatus.WAITING:
                sequence.num_cached_tokens = num_cached_tokens
                sequence.first_scheduled_time = time.monotonic()
            sequence.status = SequenceStatus.RUNNING
            self.running.append(sequence)
            out.scheduled.append(ScheduledSequence(sequence, num_new))
            budget -= num_new

    def _preempt(self, sequence: Sequence) -> None:
        self.kv.free(sequence)
        sequence.status = SequenceStatus.PREEMPTED
        sequence.num_computed_tokens = 0
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Advance each scheduled sequence past this step; append sampled tokens.

        Returns the sequences that received a token this step.
        """
        advanced = []
        for item in out.scheduled:
            sequence = item.sequence
            self.in_flight.discard(id(sequence))
            if sequence.is_finished:  # aborted while its batch was in flight
                continue
            sequence.num_computed_tokens += item.num_new_tokens
            self.num_computed_tokens += item.num_new_tokens
            self.kv.cache_full_blocks(sequence)
            token = sampled.get(sequence.sequence_id)
            if token is not None:
                sequence.append_token(token)
                advanced.append(sequence)
        return advanced

    def finish(self, sequence: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if not sequence.is_finished:
            sequence.finish(reason, stop_reason)
        self.remove_finished([sequence])

    def remove_finished(self, sequences: list[Sequence]) -> None:
        """Free the blocks of the given finished sequences and drop them from the queues."""
        done = {id(r) for r in sequences if r.is_finished}
        if not done:
            return
        for sequence in sequences:
            if id(sequence) in done and sequence.block_ids:
                self.kv.free(sequence)
        self.running = [r for r in self.running if id(r) not in done]
        self.waiting = deque(r for r in self.waiting if id(r) not in done)

    def abort(self, sequence: Sequence) -> None:
        self.finish(sequence, "abort")

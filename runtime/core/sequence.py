"""A sequence's life inside the engine: its tokens, blocks, status and outputs."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from kubellm.runtime.core.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the top-N alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    top: dict[int, float]


class Sequence:
    """One sequence being generated; a `Request` for n of them shares its prompt."""

    def __init__(
        self,
        sequence_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        seed: int | None = None,
    ) -> None:
        self.sequence_id = sequence_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.logprobs: list[TokenLogprobs] = []
        # params.prompt_logprobs: per prompt position, how likely that token was given the
        # ones before it (None at 0: nothing predicts the first token).
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            None if params.prompt_logprobs is None else [None] * len(prompt_token_ids)
        )
        # n > 1: the first sequence of the prompt, whose prefill this one waits for so it
        # can take the prompt's full blocks from the prefix cache instead of recomputing.
        self.prompt_leader: Sequence | None = None
        self.matcher = None  # structured output: this sequence's xgrammar GrammarMatcher
        self.stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_token_ids
        )
        self.max_total_tokens = self._max_total_tokens(max_model_len)
        # any integer is a valid seed; torch takes 64 bits
        self.generator = None if seed is None else torch.Generator().manual_seed(seed % 2**64)

    def _max_total_tokens(self, max_model_len: int) -> int:
        limit = max_model_len
        if self.params.max_tokens is not None:
            limit = min(limit, len(self.prompt_token_ids) + self.params.max_tokens)
        return limit

    @property
    def queue_seconds(self) -> float:
        """Time from arrival until first scheduled (0 while still waiting)."""
        if self.first_scheduled_time is None:
            return 0.0
        return self.first_scheduled_time - self.arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def waits_for_prompt_leader(self) -> bool:
        leader = self.prompt_leader
        return (
            leader is not None
            and not leader.is_finished
            and leader.num_computed_tokens < len(leader.prompt_token_ids)
        )

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and finish the sequence if a token-level stop condition holds."""
        self.token_ids.append(token_id)
        if self.num_output_tokens > self.params.min_tokens and token_id in self.stop_token_ids:
            self.finish("stop", stop_reason=None if self._is_eos(token_id) else token_id)
        elif self.num_tokens >= self.max_total_tokens:
            self.finish("length")

    def _is_eos(self, token_id: int) -> bool:
        return token_id not in self.params.stop_token_ids

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

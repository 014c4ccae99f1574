"""The attention backend interface and the flat-batch metadata it reads.

A batch is flat: the new tokens of every scheduled request, one after another,
no padding. Request i owns query rows `query_start_loc[i]:query_start_loc[i+1]`
and, after this step, has `seq_lens[i]` tokens of context, whose K/V live in the
blocks listed in `block_tables[i]`. The new tokens are the last ones of that
context, so attention is causal within each request.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from kubellm.runtime.executor.step_plan import cdiv


@dataclass
class TokenQueries:
    """Some of a step's tokens, each a one-token query over its own context in the paged
    cache, for a backend that attends them in one call."""

    requests: list[int]  # the indices in the step of the requests they belong to
    rows: torch.Tensor  # [n] int64: their query rows
    seq_lens: torch.Tensor  # [n]: the context each attends, itself included
    block_tables: torch.Tensor  # [n, blocks] int64: where that context lives


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes; -1 skips
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32, context length including the new tokens
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int64, padded with 0
    block_size: int
    # Bounds over the batch; they choose kernel grids. A CUDA graph's metadata gives the
    # bounds of every step it may replay (one query token, the longest context served).
    max_query_len: int
    max_seq_len: int
    # Host copies for the torch backend, which loops over requests. Empty in a CUDA
    # graph's metadata (only backends with `supports_cuda_graphs` replay graphs).
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Per request: its first block id when its blocks are consecutive ids (the
    # context can then be read in place), else -1.
    contiguous_starts: list[int]

    @cached_property
    def skips_slots(self) -> bool:
        """Whether some new token writes its K/V nowhere (slot -1; asked once per step)."""
        return bool((self.slot_mapping < 0).any())

    @cached_property
    def one_token_requests(self) -> TokenQueries | None:
        """Every request of the step with one new token (None: none; computed once)."""
        requests = [i for i, q_len in enumerate(self.query_lens_cpu) if q_len == 1]
        return self._decodes(requests) if requests else None

    @cached_property
    def token_contexts(self) -> TokenQueries:
        """Every new token of the step as a one-token query over its own causal context
        (its position + 1 positions of its request's blocks), computed once. A backend
        that attends each token so computes it the same way whether it came in a whole
        prompt, a prefill chunk after a prefix-cache hit, or a decode step."""
        decodes = self.one_token_requests
        if decodes is not None and len(decodes.requests) == len(self.query_lens_cpu):
            return decodes
        device = self.seq_lens.device
        query_lens = torch.tensor(self.query_lens_cpu, device=device)
        owner = torch.repeat_interleave(torch.arange(len(query_lens), device=device), query_lens)
        rows = torch.arange(len(owner), device=device)
        first_position = self.seq_lens.long() - query_lens  # of each request's new tokens
        offset = rows - self.query_start_loc[:-1].long()[owner]
        seq_lens = (first_position[owner] + offset + 1).contiguous()
        requests = list(range(len(self.query_lens_cpu)))
        return TokenQueries(requests, rows, seq_lens, self.block_tables[owner])

    def _decodes(self, requests: list[int]) -> TokenQueries:
        """Decoding requests (one new token each) as queries over their contexts."""
        starts, seq_lens = self.query_start_loc[:-1].long(), self.seq_lens.long()
        if len(requests) == len(self.query_lens_cpu):
            return TokenQueries(requests, starts, seq_lens, self.block_tables)
        index = torch.tensor(requests, device=self.seq_lens.device)
        return TokenQueries(requests, starts[index], seq_lens[index], self.block_tables[index])

    @cached_property
    def request_blocks(self) -> list[torch.Tensor]:
        """Per request, the block ids that hold its context (computed once per step)."""
        return [
            self.block_tables[i, : cdiv(seq_len, self.block_size)]
            for i, seq_len in enumerate(self.seq_lens_cpu)
        ]


class AttentionBackend(Protocol):
    """`forward` writes the new K/V into the cache, then attends over the cached context."""

    # True when `forward` reads only tensors and the metadata's bounds (no host copies,
    # no host syncs), so a decode step through it can be captured in a CUDA graph.
    supports_cuda_graphs: bool

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

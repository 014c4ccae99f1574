"""The host attention backends (torch's, and the CPU one on kubellm's C kernels) against
attention written out per request, over a paged pool with scattered blocks: decodes
batched into one call, decodes left out of it (one much longer context), prefill chunks
after cached context, and whole prompts."""

from __future__ import annotations

import math

import pytest
import torch

from kubellm.kernels import cpu_library
from kubellm.runtime.executor.platform.cpu_attention import CpuAttentionBackend
from kubellm.runtime.executor.platform.torch_attention import TorchAttentionBackend
from kubellm.runtime.model.attention import AttentionMetadata, batched_decodes

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 16, 4


def naive(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """query [q_len, heads, dim], the whole context's keys/values [kv_len, kv_heads, dim]:
    each query row sees the context up to its own position."""
    q_len, kv_len = query.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, kv_len, dim]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = query.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(DIM)
    positions = torch.arange(kv_len - q_len, kv_len)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > positions, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def step(requests: list[tuple[int, int]], seed: int):
    """(new tokens, context after the step) per request; blocks drawn at random from a
    pool, so tables are scattered. Returns the inputs, the cache and the expected output."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per = [-(-seq_len // BLOCK) for _, seq_len in requests]
    pool = torch.randperm(sum(blocks_per) + 3, generator=gen).tolist()
    kv_cache = torch.randn(2, len(pool), BLOCK, KV_HEADS, DIM, generator=gen)
    tables, slots, expected, queries, keys, values = [], [], [], [], [], []
    for (q_len, seq_len), count in zip(requests, blocks_per):
        table, pool = pool[:count], pool[count:]
        tables.append(table)
        context_k = torch.randn(seq_len, KV_HEADS, DIM, generator=gen)
        context_v = torch.randn(seq_len, KV_HEADS, DIM, generator=gen)
        token_slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len)]
        cached = token_slots[: seq_len - q_len]  # the context before this step
        kv_cache[0].view(-1, KV_HEADS, DIM)[cached] = context_k[: seq_len - q_len]
        kv_cache[1].view(-1, KV_HEADS, DIM)[cached] = context_v[: seq_len - q_len]
        slots += token_slots[seq_len - q_len :]
        query = torch.randn(q_len, HEADS, DIM, generator=gen)
        queries.append(query)
        keys.append(context_k[seq_len - q_len :])
        values.append(context_v[seq_len - q_len :])
        expected.append(naive(query, context_k, context_v))
    width = max(len(t) for t in tables)
    query_lens = [q for q, _ in requests]
    starts = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([s for _, s in requests], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        block_size=BLOCK,
        max_query_len=max(query_lens),
        max_seq_len=max(s for _, s in requests),
        query_lens_cpu=query_lens,
        seq_lens_cpu=[s for _, s in requests],
        contiguous_starts=[-1] * len(requests),
    )
    inputs = (torch.cat(queries), torch.cat(keys), torch.cat(values), kv_cache, meta)
    return inputs, torch.cat(expected)


STEPS = {
    "decodes only, batched": [(1, 9), (1, 17), (1, 12), (1, 14)],
    "one decode": [(1, 23)],
    "decodes and prefill chunks": [(1, 13), (5, 5), (1, 10), (3, 11), (1, 16)],
    "a long decode left out of the batch": [(1, 7), (1, 9), (1, 64), (1, 8), (2, 6)],
    "prompts only": [(7, 7), (4, 4)],
}


BACKENDS = [
    TorchAttentionBackend,
    pytest.param(
        CpuAttentionBackend,
        marks=pytest.mark.skipif(
            cpu_library.unavailable() is not None, reason="needs kubellm's CPU library"
        ),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(STEPS))
def test_host_backends_equal_attention_written_out(name, backend):
    (query, key, value, kv_cache, meta), expected = step(STEPS[name], seed=len(name))
    out = backend().forward(query, key, value, kv_cache, meta, DIM**-0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The new K/V went where the slots say.
    torch.testing.assert_close(kv_cache[0].view(-1, KV_HEADS, DIM)[meta.slot_mapping], key)


def metadata(name: str) -> AttentionMetadata:
    return step(STEPS[name], seed=1)[0][-1]


def test_which_decodes_share_one_call():
    """The steps above batch what they are named for; the long decode is left out."""
    assert metadata("decodes only, batched").decode_batch.requests == [0, 1, 2, 3]
    mixed = metadata("decodes and prefill chunks").decode_batch
    assert mixed.requests == [0, 2, 4] and mixed.rows.tolist() == [0, 6, 10]
    long = metadata("a long decode left out of the batch").decode_batch
    assert long.requests == [0, 1, 3] and long.rows.tolist() == [0, 1, 3]
    assert long.block_tables.shape == (3, 3)  # padded to the longest batched context (9)
    assert metadata("one decode").decode_batch is None
    assert metadata("prompts only").decode_batch is None
    assert batched_decodes([1, 1, 1], [40, 4, 4]) == [1, 2]  # 3 x 40 > 2 x 48 tokens
    assert batched_decodes([1, 2, 1], [8, 9, 10]) == [0, 2]


def test_which_requests_the_cpu_backend_attends_in_one_call():
    """Every one-token request, however long its context; none in a prompts-only step."""
    mixed = metadata("decodes and prefill chunks").one_token_requests
    assert mixed.requests == [0, 2, 4] and mixed.rows.tolist() == [0, 6, 10]
    assert mixed.seq_lens.tolist() == [13, 10, 16] and mixed.block_tables.shape[0] == 3
    long = metadata("a long decode left out of the batch").one_token_requests
    assert long.requests == [0, 1, 2, 3] and long.seq_lens.tolist() == [7, 9, 64, 8]
    assert metadata("prompts only").one_token_requests is None

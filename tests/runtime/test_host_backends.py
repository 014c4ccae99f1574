"""The host attention backends (torch's, and the CPU one on kubellm's C kernels) against
attention written out per request, over a paged pool with scattered blocks: decodes,
decodes beside one much longer context, prefill chunks after cached context, and whole
prompts; and a token's bits the same however its step was made up."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kubellm.kernels import cpu_library
from kubellm.runtime.executor.platform.cpu_attention import CpuAttentionBackend
from kubellm.runtime.executor.platform.torch_attention import TorchAttentionBackend
from kubellm.runtime.model.attention import AttentionMetadata

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


def step_metadata(
    requests: list[tuple[int, int]], block_tables: torch.Tensor, slots: torch.Tensor
) -> AttentionMetadata:
    """The metadata of a step of (new tokens, context after the step) per request, its
    blocks scattered (none read in place)."""
    query_lens = [q for q, _ in requests]
    seq_lens = [s for _, s in requests]
    return AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        block_size=BLOCK,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        contiguous_starts=[-1] * len(requests),
    )


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
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    meta = step_metadata(requests, padded, torch.tensor(slots))
    inputs = (torch.cat(queries), torch.cat(keys), torch.cat(values), kv_cache, meta)
    return inputs, torch.cat(expected)


STEPS = {
    "decodes only": [(1, 9), (1, 17), (1, 12), (1, 14)],
    "one decode": [(1, 23)],
    "decodes and prefill chunks": [(1, 13), (5, 5), (1, 10), (3, 11), (1, 16)],
    "decodes beside a long one": [(1, 7), (1, 9), (1, 64), (1, 8), (2, 6)],
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


def test_which_requests_the_cpu_backend_attends_in_one_call():
    """Every one-token request, however long its context; none in a prompts-only step."""
    mixed = metadata("decodes and prefill chunks").one_token_requests
    assert mixed.requests == [0, 2, 4] and mixed.rows.tolist() == [0, 6, 10]
    assert mixed.seq_lens.tolist() == [13, 10, 16] and mixed.block_tables.shape[0] == 3
    long = metadata("decodes beside a long one").one_token_requests
    assert long.requests == [0, 1, 2, 3] and long.seq_lens.tolist() == [7, 9, 64, 8]
    assert metadata("prompts only").one_token_requests is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_gets_the_same_bits_however_its_step_is_made_up(backend):
    """One 37-token context in the cache, its tokens attended as a whole prompt, as
    prefill chunks after cached blocks (at block boundaries and not), and as decodes
    beside other requests' tokens (every request here reads the same blocks): each
    token's output must equal, bit for bit, what it got in the whole prompt."""
    n = 37
    gen = torch.Generator().manual_seed(5)
    table = torch.randperm(n // BLOCK + 6, generator=gen)[: -(-n // BLOCK)].tolist()
    kv_cache = torch.randn(2, n // BLOCK + 6, BLOCK, KV_HEADS, DIM, generator=gen)
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
    keys = kv_cache[0].view(-1, KV_HEADS, DIM)[slots].clone()
    values = kv_cache[1].view(-1, KV_HEADS, DIM)[slots].clone()
    queries = torch.randn(n, HEADS, DIM, generator=gen)

    def attend(requests: list[tuple[int, int]]) -> list[torch.Tensor]:
        """(new tokens, context) per request, all over this context's blocks."""
        rows = torch.cat([torch.arange(s - q, s) for q, s in requests])
        meta = step_metadata(requests, torch.tensor([table] * len(requests)), slots[rows])
        out = backend().forward(queries[rows], keys[rows], values[rows], kv_cache, meta, 0.25)
        return list(zip(rows.tolist(), out))

    whole = dict(attend([(n, n)]))
    steps = [
        [(n - 2 * BLOCK, n)],  # a prefill chunk after two cached blocks
        [(n - 13, n), (1, 9)],  # a chunk that starts mid-block, beside a decode
        [(1, 2), (1, 30), (1, n), (4, 21), (1, 17)],  # decodes of every length beside a chunk
        [(1, p) for p in range(1, n + 1)],
    ]
    for requests in steps:
        for row, out in attend(requests):
            assert torch.equal(out, whole[row]), (requests, row)

"""Each Triton kernel against its pure-torch reference, over seeded random cases:
GQA 1/3/4/8, head dims 64 and 128, block sizes 16 and 32, ragged lengths, prefill
chunks after a prefix hit, decodes, padding slots. Grids stay small: the interpreter
runs ~0.5 ms per program instance."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kubellm.kernels.paged_attention import paged_attention, paged_decode, write_kv
from kubellm.kernels.reference import paged_attention_reference, write_kv_reference
from tests.helpers import TRITON_DEVICE

DEVICE = TRITON_DEVICE
# fp32 and fp16 are exact enough in the interpreter; bf16 only on a GPU (see REFERENCE.md)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _batch(rng: random.Random, shapes, num_kv_heads, group, head_dim, block_size, dtype):
    """Requests given as (new tokens, context after this step), their blocks scattered
    over a shuffled pool, the context's K/V already in the cache."""
    max_blocks = max(-(-seq // block_size) for _, seq in shapes)
    pool = list(range(len(shapes) * max_blocks + 3))
    rng.shuffle(pool)
    tables = torch.zeros(len(shapes), max_blocks, dtype=torch.int32)
    for i in range(len(shapes)):
        tables[i] = torch.tensor(pool[i * max_blocks : (i + 1) * max_blocks])
    shape = (len(pool), block_size, num_kv_heads, head_dim)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    starts = [0]
    for q_len, _ in shapes:
        starts.append(starts[-1] + q_len)
    query = torch.randn(starts[-1], num_kv_heads * group, head_dim, generator=gen).to(dtype)
    return (
        query.to(DEVICE),
        k_cache.to(DEVICE),
        v_cache.to(DEVICE),
        tables.to(DEVICE),
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor([s for _, s in shapes], dtype=torch.int32, device=DEVICE),
    )


MIXED = [  # (new tokens, context): fresh prefill, decodes, a chunk after a prefix hit
    [(5, 5), (1, 37), (6, 40), (1, 16), (3, 3)],
    [(17, 17), (1, 1), (2, 65)],
]
CASES = [  # (kv heads, group, head dim, block size)
    (2, 1, 64, 16),
    (1, 3, 64, 32),
    (2, 4, 128, 16),
    (1, 8, 64, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim", "block_size"), CASES)
@pytest.mark.parametrize("shapes", MIXED, ids=["five-kinds", "long-chunk"])
def test_paged_attention_matches_the_reference(
    shapes, num_kv_heads, group, head_dim, block_size, dtype
):
    rng = random.Random(hash((tuple(shapes), num_kv_heads, group, head_dim, block_size)))
    query, k_cache, v_cache, tables, starts, seq_lens = _batch(
        rng, shapes, num_kv_heads, group, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5
    max_q = max(q for q, _ in shapes)
    got = paged_attention(query, k_cache, v_cache, tables, starts, seq_lens, scale, max_q)
    want = paged_attention_reference(
        query.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), starts.cpu(), seq_lens.cpu(), scale
    )
    torch.testing.assert_close(
        got.cpu().float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
    )


@pytest.mark.parametrize(("num_kv_heads", "group", "head_dim", "block_size"), CASES[:3])
def test_split_kv_decode_matches_the_reference(num_kv_heads, group, head_dim, block_size):
    shapes = [(1, 600), (1, 5), (1, 270)]  # 3, 1 and 2 segments at 16, 2/1/1 at 32
    rng = random.Random(group)
    query, k_cache, v_cache, tables, starts, seq_lens = _batch(
        rng, shapes, num_kv_heads, group, head_dim, block_size, torch.float32
    )
    scale = head_dim**-0.5
    got = paged_decode(query, k_cache, v_cache, tables, seq_lens, scale)
    want = paged_attention_reference(
        query.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), starts.cpu(), seq_lens.cpu(), scale
    )
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_token_gets_the_same_bits_from_either_kernel_in_any_launch(dtype):
    """One 600-token context (three segments): its tokens attended as a whole prompt, as
    a chunk after a prefix hit that starts mid-segment, as decodes beside other requests
    through `paged_attention`, and as split-KV decodes through `paged_decode`: each
    token's output equals, bit for bit, what it got in the whole prompt."""
    num_kv_heads, group, head_dim, block_size, n = 1, 3, 64, 16, 600
    rng = random.Random(3)
    query, k_cache, v_cache, table, _, _ = _batch(
        rng, [(n, n)], num_kv_heads, group, head_dim, block_size, dtype
    )
    scale = head_dim**-0.5

    def attend(requests: list[tuple[int, int]], split: bool = False) -> torch.Tensor:
        """(new tokens, context) per request, all over this context's blocks."""
        rows = torch.cat([torch.arange(s - q, s) for q, s in requests]).to(DEVICE)
        starts = torch.tensor([0, *itertools.accumulate(q for q, _ in requests)]).to(DEVICE)
        seq_lens = torch.tensor([s for _, s in requests], dtype=torch.int32, device=DEVICE)
        tables = table.expand(len(requests), -1)
        if split:
            return paged_decode(query[rows], k_cache, v_cache, tables, seq_lens, scale)
        max_q = max(q for q, _ in requests)
        starts = starts.int()
        return paged_attention(
            query[rows], k_cache, v_cache, tables, starts, seq_lens, scale, max_q
        )

    whole = attend([(n, n)])
    chunk = attend([(n - 300, n), (1, 9)])  # a chunk that starts mid-segment
    assert torch.equal(chunk[: n - 300], whole[300:])
    assert torch.equal(chunk[-1], whole[8])
    positions = [1, 16, 255, 256, 257, 511, 599]
    decodes = [(1, p + 1) for p in positions]
    assert torch.equal(attend(decodes), whole[positions])
    assert torch.equal(attend(decodes, split=True), whole[positions])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(2, 64), (1, 128)])
def test_write_kv_matches_the_reference_and_skips_padding(num_kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(head_dim)
    blocks, block_size, tokens = 5, 16, 9
    k_cache = torch.zeros(blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens].int()
    slots[[2, 7]] = -1  # padding (CUDA-graph batches are padded this way)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(key, value, want_k, want_v, slots)
    got_k, got_v = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(key.to(DEVICE), value.to(DEVICE), got_k, got_v, slots.to(DEVICE))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)
    assert int((got_k != 0).any(dim=(2, 3)).sum()) == tokens - 2  # nothing else touched


def test_write_kv_reads_strided_inputs():
    """The model hands K and V as views of one fused QKV projection (non-contiguous)."""
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 4 * 64, generator=gen)
    key = qkv[:, 128:192].view(6, 1, 64)
    value = qkv[:, 192:].view(6, 1, 64)
    k_cache = torch.zeros(2, 16, 1, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 1, 2, 17, 18, 31], dtype=torch.int32)
    write_kv(key.to(DEVICE), value.to(DEVICE), k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache.cpu().view(-1, 1, 64)[slots.long()], key)
    assert torch.equal(v_cache.cpu().view(-1, 1, 64)[slots.long()], value)

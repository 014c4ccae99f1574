"""kubellm's C kernels for a layer's small ops against their torch forms (`TorchOps`, the
kernels' references in kernels/reference.py): RMSNorm with and without the residual add,
rotary embeddings on strided heads (bit for bit: the same products and sums), SiLU(gate) *
up over the exp polynomial's whole range, the KV writes with skipped slots, and decode
attention over scattered blocks (contexts shorter than, across and not a multiple of
eight positions, block sizes that are not, grouped heads, heads of 8 to 128)."""

from __future__ import annotations

import pytest
import torch

from kubellm.kernels import cpu_library, cpu_ops
from kubellm.kernels.reference import paged_attention_reference, write_kv_reference
from kubellm.runtime.executor.platform.x86 import CpuOps
from kubellm.runtime.model.layer_ops import TorchOps
from kubellm.runtime.model.rope import RopeTables

pytestmark = pytest.mark.skipif(
    cpu_library.unavailable() is not None, reason="needs AVX2, FMA, F16C and a C compiler"
)


def _random(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize(("rows", "size"), [(1, 576), (7, 64), (9, 100)])
def test_add_rms_norm_matches_torch(rows, size):
    x, weight = _random(rows, size, seed=1), _random(size, seed=3)
    residual = _random(rows, size, seed=2, scale=5)
    expected, expected_sum = TorchOps.add_rms_norm(x, residual.clone(), weight, 1e-5)
    out, total = CpuOps.add_rms_norm(x, residual, weight, 1e-5)
    assert total is residual and torch.equal(total, expected_sum)  # summed in place, exactly
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    alone, same = CpuOps.add_rms_norm(x, None, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(
        alone, TorchOps.add_rms_norm(x, None, weight, 1e-5)[0], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(("tokens", "heads", "dim"), [(1, 12, 64), (6, 3, 16), (5, 4, 128)])
def test_rotate_matches_torch_bit_for_bit(tokens, heads, dim):
    qkv = _random(tokens, (heads + 2) * dim, seed=tokens)
    rope = RopeTables(_random(tokens, 1, dim, seed=4), _random(tokens, 1, dim, seed=5))
    qk = qkv[:, : heads * dim].view(tokens, heads, dim)  # token rows wider than the heads
    expected = TorchOps.rotate(qk, rope)
    untouched = qkv[:, heads * dim :].clone()
    assert CpuOps.rotate(qk, rope).data_ptr() == qk.data_ptr()
    assert torch.equal(qk, expected) and torch.equal(qkv[:, heads * dim :], untouched)


@pytest.mark.parametrize(("rows", "width"), [(1, 3072), (3, 20), (40, 1000)])
def test_silu_and_mul_matches_torch(rows, width):
    gate_up = _random(rows, width, seed=rows, scale=30)  # far into both tails of e^-g
    gate_up[0, :4] = torch.tensor([0.0, -100.0, 100.0, 1e-3])
    torch.testing.assert_close(
        CpuOps.silu_and_mul(gate_up), TorchOps.silu_and_mul(gate_up), rtol=2e-6, atol=1e-6
    )


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("kv_heads", "dim"), [(2, 8), (1, 6)])
def test_write_kv_puts_rows_in_their_slots_and_skips_padding(cache_dtype, kv_heads, dim):
    """fp16: torch's rounding of the rows (to nearest even), bit for bit, also for the
    last values of rows that are not a multiple of eight."""
    kv_cache = _random(2, 6, 4, kv_heads, dim, seed=6).to(cache_dtype)
    expected = kv_cache.clone()
    width = kv_heads * dim
    qkv = _random(4, 3 * width, seed=7)  # key and value are strided views, as in the model
    key = qkv[:, width : 2 * width].view(4, kv_heads, dim)
    value = qkv[:, 2 * width :].view(4, kv_heads, dim)
    slots = torch.tensor([3, -1, 21, 8])
    cpu_ops.write_kv(key, value, kv_cache, slots)
    write_kv_reference(key, value, expected[0], expected[1], slots)
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize(
    ("seq_lens", "block_size", "heads", "kv_heads", "dim"),
    [
        ([1, 5, 8, 9, 37], 16, 9, 3, 64),
        ([130, 3], 5, 4, 4, 128),
        ([17, 64], 16, 2, 1, 8),
        ([23], 4, 6, 2, 24),
        ([3, 40, 17, 9, 64], 16, 8, 2, 32),
        ([12, 33, 50, 7], 8, 16, 2, 40),
    ],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_decode_attention_matches_the_reference(
    seq_lens, block_size, heads, kv_heads, dim, cache_dtype
):
    """An fp16 cache: the reference over its values in fp32 (the kernel's arithmetic)."""
    per_request = [-(-n // block_size) for n in seq_lens]
    blocks = sum(per_request) + 3
    kv_cache = _random(2, blocks, block_size, kv_heads, dim, seed=8).to(cache_dtype)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(9))
    tables = torch.zeros(len(seq_lens), max(per_request), dtype=torch.int64)
    used = 0
    for r, count in enumerate(per_request):  # scattered, in no order
        tables[r, :count], used = order[used : used + count], used + count
    tokens = len(seq_lens)
    qkv = _random(tokens, (heads + 2 * kv_heads) * dim, seed=10, scale=3)
    query = qkv[:, : heads * dim].view(tokens, heads, dim)
    lens = torch.tensor(seq_lens)
    out = torch.full((tokens, heads, dim), float("nan"))
    cpu_ops.decode_attention(query, kv_cache, torch.arange(tokens), lens, tables, dim**-0.5, out)
    starts = torch.arange(tokens + 1, dtype=torch.int32)
    k_cache, v_cache = kv_cache.float()
    expected = paged_attention_reference(
        query, k_cache, v_cache, tables, starts, lens.int(), dim**-0.5
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_attention_over_fp16_equals_fp32_holding_the_same_values():
    """An fp16 cache is read as the fp32 values it holds: the same bits as an fp32 cache
    of those values, so the cache's dtype changes only what is stored."""
    half = _random(2, 5, 16, 2, 64, seed=13).half()
    query = _random(3, 6, 64, seed=14, scale=3)
    lens, tables = (
        torch.tensor([70, 9, 33]),
        torch.tensor([[4, 0, 2, 1, 3], [1, 0, 0, 0, 0], [3, 2, 0, 0, 0]]),
    )
    outs = []
    for kv_cache in (half, half.float()):
        out = torch.empty(3, 6, 64)
        cpu_ops.decode_attention(query, kv_cache, torch.arange(3), lens, tables, 0.125, out)
        outs.append(out)
    assert torch.equal(*outs)


def test_decode_attention_of_a_request_is_the_same_alone_or_in_a_batch():
    """Alone, a request's query heads are attended one by one; in a batch, a KV head's
    query heads together (each K and V row read once for them): the same bits."""
    kv_cache = _random(2, 48, 16, 3, 64, seed=15).half()
    query = _random(8, 9, 64, seed=16, scale=3)
    lens = torch.tensor([45, 70, 3, 16, 33, 90, 1, 60])
    tables = torch.randperm(48, generator=torch.Generator().manual_seed(17)).view(8, 6)
    batch = torch.empty(8, 9, 64)
    cpu_ops.decode_attention(query, kv_cache, torch.arange(8), lens, tables, 0.125, batch)
    for r in (0, 5):
        alone = torch.empty(1, 9, 64)
        cpu_ops.decode_attention(
            query[r : r + 1],
            kv_cache,
            torch.arange(1),
            lens[r : r + 1],
            tables[r : r + 1],
            0.125,
            alone,
        )
        assert torch.equal(alone[0], batch[r])


def test_decode_attention_writes_only_the_rows_it_is_given():
    """A mixed step's decodes: their rows of out, nothing else."""
    kv_cache = _random(2, 4, 16, 1, 16, seed=11)
    query = _random(5, 2, 16, seed=12)
    rows, lens = torch.tensor([4, 1]), torch.tensor([20, 7])
    tables = torch.tensor([[2, 0], [3, 0]])
    out = torch.full((5, 2, 16), float("nan"))
    cpu_ops.decode_attention(query, kv_cache, rows, lens, tables, 0.25, out)
    starts = torch.arange(3, dtype=torch.int32)
    expected = paged_attention_reference(
        query[rows], kv_cache[0], kv_cache[1], tables, starts, lens.int(), 0.25
    )
    torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)
    assert out[[0, 2, 3]].isnan().all()

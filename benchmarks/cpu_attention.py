"""Decode attention on CPU through the torch backend: a step's decoding requests in one
padded SDPA call (what the backend does) against one call per request (what it did),
over a paged pool with scattered blocks, the built-in model's heads (9 query, 3 KV, 64
dims); and what a half-size KV cache (fp16 or bf16, attended natively or upcast after
the gather) would cost instead of fp32.

    python benchmarks/cpu_attention.py

Median microseconds of one layer's attention for a decode step, 2 threads.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from timing import cpu_model, median_seconds

from kubellm.runtime.executor.platform.torch_attention import TorchAttentionBackend
from kubellm.runtime.model.attention import AttentionMetadata

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
BATCHES = (4, 16, 64)


def microseconds(run) -> float:
    return median_seconds(run) * 1e6


def decode_step(batch: int, rng: random.Random):
    """Contexts of 40-320 tokens (prompts of 16-256 plus replies), blocks scattered."""
    seq_lens = [rng.randint(40, 320) for _ in range(batch)]
    counts = [-(-s // BLOCK) for s in seq_lens]
    pool = list(range(sum(counts)))
    rng.shuffle(pool)
    tables, start = [], 0
    for count in counts:
        tables.append(pool[start : start + count])
        start += count
    width = max(counts)
    kv_cache = torch.randn(2, len(pool), BLOCK, KV_HEADS, DIM)
    slots = [t[(s - 1) // BLOCK] * BLOCK + (s - 1) % BLOCK for t, s in zip(tables, seq_lens)]

    def metadata() -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            block_size=BLOCK,
            max_query_len=1,
            max_seq_len=max(seq_lens),
            query_lens_cpu=[1] * batch,
            seq_lens_cpu=seq_lens,
            contiguous_starts=[-1] * batch,
        )

    new = (
        torch.randn(batch, HEADS, DIM),
        torch.randn(batch, KV_HEADS, DIM),
        torch.randn(batch, KV_HEADS, DIM),
    )
    return new, kv_cache, metadata


def backend_timings(batch: int, rng: random.Random) -> tuple[float, float]:
    """The backend as it is, and with every request attended by its own call."""
    (query, key, value), kv_cache, metadata = decode_step(batch, rng)
    backend = TorchAttentionBackend()
    batched, alone = metadata(), metadata()
    alone.__dict__["decode_batch"] = None  # what the backend did before
    return tuple(
        microseconds(lambda m=meta: backend.forward(query, key, value, kv_cache, m, DIM**-0.5))
        for meta in (batched, alone)
    )


def kv_dtype_timings(batch: int, rng: random.Random) -> dict[str, float]:
    """Gather plus one SDPA call with the pool in each dtype."""
    (query, _, _), kv_cache, metadata = decode_step(batch, rng)
    meta = metadata()
    blocks = meta.block_tables.reshape(-1)
    shape = (batch, meta.block_tables.shape[1] * BLOCK, KV_HEADS, DIM)
    visible = torch.arange(shape[1]) < meta.seq_lens[:, None]
    rows = kv_cache.view(2, kv_cache.shape[1], -1)

    def attend(pool: torch.Tensor, dtype: torch.dtype):
        k = pool[0].index_select(0, blocks).view(shape).transpose(1, 2).to(dtype)
        v = pool[1].index_select(0, blocks).view(shape).transpose(1, 2).to(dtype)
        return F.scaled_dot_product_attention(
            query.to(dtype)[:, :, None], k, v, attn_mask=visible[:, None, None], enable_gqa=True
        )

    out = {"fp32": microseconds(lambda: attend(rows, torch.float32))}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        half = rows.to(dtype)
        out[f"{name}"] = microseconds(lambda h=half, d=dtype: attend(h, d))
        out[f"{name} upcast"] = microseconds(lambda h=half: attend(h, torch.float32))
    return out


def main() -> None:
    torch.set_num_threads(2)
    model = cpu_model()
    print(f"CPU: {model}; torch {torch.__version__}; 2 threads; microseconds (median)\n")
    rng = random.Random(0)
    print("| requests | one call (the backend) | a call per request |")
    print("|---|---|---|")
    for batch in BATCHES:
        batched, alone = backend_timings(batch, rng)
        print(f"| {batch} | {batched:,.0f} | {alone:,.0f} |", flush=True)
    print("\n| requests | fp32 pool | fp16 | fp16 upcast | bf16 | bf16 upcast |")
    print("|---|---|---|---|---|---|")
    for batch in BATCHES:
        cells = " | ".join(f"{t:,.0f}" for t in kv_dtype_timings(batch, rng).values())
        print(f"| {batch} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

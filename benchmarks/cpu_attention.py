"""Attention on CPU through the torch backend, the built-in model's heads (9 query, 3 KV,
64 dims), over a paged pool with scattered blocks: the backend (a call per token, which
gives a token the same bits in any step) against the calls whose results depend on the
step's shape that it replaced (a step's decoding requests in one padded SDPA call; a
prefill chunk in one causal call); and what a half-size KV cache (fp16 or bf16, attended
natively or upcast after the gather) would cost instead of fp32.

    python benchmarks/cpu_attention.py

Median microseconds of one layer's attention, 2 threads.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from timing import cpu_model, median_seconds

from kubellm.runtime.executor.platform.torch_attention import (
    TorchAttentionBackend,
    kv_rows,
    write_kv,
)
from kubellm.runtime.model.attention import AttentionMetadata

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
BATCHES = (4, 16, 64)
PREFILLS = ((512, 512), (256, 512))  # (new tokens, context after the step)


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
    """The backend, and the step's decodes in one padded call."""
    (query, key, value), kv_cache, metadata = decode_step(batch, rng)
    meta = metadata()
    return (
        microseconds(
            lambda: TorchAttentionBackend().forward(query, key, value, kv_cache, meta, DIM**-0.5)
        ),
        microseconds(lambda: padded_decodes(query, key, value, kv_cache, meta)),
    )


def padded_decodes(query, key, value, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
    """What the backend did with a decode step: contexts gathered, padded to the longest
    and attended in one masked call."""
    write_kv(key, value, kv_cache, meta.slot_mapping, False)
    k_rows, v_rows = kv_rows(kv_cache)
    shape = (len(meta.seq_lens_cpu), meta.block_tables.shape[1] * BLOCK, KV_HEADS, DIM)
    blocks = meta.block_tables.reshape(-1)
    k = k_rows.index_select(0, blocks).view(shape).transpose(1, 2)
    v = v_rows.index_select(0, blocks).view(shape).transpose(1, 2)
    visible = torch.arange(shape[1]) < meta.seq_lens[:, None]
    out = F.scaled_dot_product_attention(
        query[:, :, None], k, v, attn_mask=visible[:, None, None], scale=DIM**-0.5, enable_gqa=True
    )
    return out[:, :, 0]


def prefill_timings(new: int, context: int) -> tuple[float, float]:
    """One request's prefill chunk of `new` tokens ending a `context`-token context, its
    blocks consecutive: the backend, and one causal call over the context."""
    blocks = -(-context // BLOCK)
    kv_cache = torch.randn(2, blocks, BLOCK, KV_HEADS, DIM)
    query, key, value = (torch.randn(new, heads, DIM) for heads in (HEADS, KV_HEADS, KV_HEADS))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(context - new, context),
        query_start_loc=torch.tensor([0, new], dtype=torch.int32),
        seq_lens=torch.tensor([context], dtype=torch.int32),
        block_tables=torch.arange(blocks)[None],
        block_size=BLOCK,
        max_query_len=new,
        max_seq_len=context,
        query_lens_cpu=[new],
        seq_lens_cpu=[context],
        contiguous_starts=[0],
    )
    k = kv_cache[0].view(-1, KV_HEADS, DIM)[:context].transpose(0, 1)[None]
    v = kv_cache[1].view(-1, KV_HEADS, DIM)[:context].transpose(0, 1)[None]
    mask = torch.arange(context)[None, :] <= torch.arange(context - new, context)[:, None]
    causal = dict(is_causal=True) if new == context else dict(attn_mask=mask)

    def one_call():
        write_kv(key, value, kv_cache, meta.slot_mapping, False)
        return F.scaled_dot_product_attention(
            query.transpose(0, 1)[None], k, v, scale=DIM**-0.5, enable_gqa=True, **causal
        )

    backend = TorchAttentionBackend()
    return (
        median_seconds(lambda: backend.forward(query, key, value, kv_cache, meta, DIM**-0.5), 5)
        * 1e6,
        median_seconds(one_call, 5) * 1e6,
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


def row(name: str, backend: float, one_call: float) -> None:
    print(f"| {name} | {backend:,.0f} | {one_call:,.0f} | {backend / one_call:.2f}x |", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    model = cpu_model()
    print(f"CPU: {model}; torch {torch.__version__}; 2 threads; microseconds (median)\n")
    rng = random.Random(0)
    print("| step | the backend (a call per token) | one call (padded / causal) | ratio |")
    print("|---|---|---|---|")
    for batch in BATCHES:
        row(f"{batch} decodes", *backend_timings(batch, rng))
    for new, context in PREFILLS:
        row(f"prefill of {new} ending {context} tokens", *prefill_timings(new, context))
    print("\n| requests | fp32 pool | fp16 | fp16 upcast | bf16 | bf16 upcast |")
    print("|---|---|---|---|---|---|")
    for batch in BATCHES:
        cells = " | ".join(f"{t:,.0f}" for t in kv_dtype_timings(batch, rng).values())
        print(f"| {batch} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

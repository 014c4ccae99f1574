"""Decode attention on the GPU: our paged kernels against the device's copy bandwidth and
against SDPA on the same K/V laid out contiguously, measured in the same run.

    python benchmarks/attention.py [--batches 1 8 64 256] [--contexts 512 4096 32768]

Shape: GQA 32 query / 8 KV heads, head dim 128, bf16, block size 16; each request's
blocks scattered over the pool. GB/s counts the K/V bytes a decode must read.
Needs CUDA (the interpreter would measure nothing useful).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kubellm.kernels.paged_attention import paged_attention, paged_decode
from kubellm.runtime.executor.platform.triton_attention import splits_decode

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16


def _time(fn, repeats: int = 20) -> float:
    """Median seconds per call, CUDA events, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _time(lambda: dst.copy_(src)) / 1e9


def case(batch: int, context: int, num_sms: int) -> dict:
    blocks_per_request = -(-context // BLOCK)
    pool = batch * blocks_per_request
    dtype = torch.bfloat16
    k_cache = torch.randn(pool, BLOCK, KV_HEADS, DIM, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(pool, device="cuda", dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, HEADS, DIM, dtype=dtype, device="cuda")
    scale = DIM**-0.5
    splits = splits_decode(batch, KV_HEADS, blocks_per_request, num_sms)
    if splits:
        ours = _time(lambda: paged_decode(query, k_cache, v_cache, tables, seq_lens, scale))
    else:
        ours = _time(
            lambda: paged_attention(query, k_cache, v_cache, tables, starts, seq_lens, scale, 1)
        )
    k = k_cache[tables.long()].reshape(batch, -1, KV_HEADS, DIM)[:, :context].transpose(1, 2)
    v = v_cache[tables.long()].reshape(batch, -1, KV_HEADS, DIM)[:, :context].transpose(1, 2)
    k, v, q = k.contiguous(), v.contiguous(), query[:, :, None]
    sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))
    kv_bytes = 2 * batch * context * KV_HEADS * DIM * 2
    return {
        "batch": batch,
        "context": context,
        "splits": splits,
        "ours_ms": ours * 1e3,
        "sdpa_ms": sdpa * 1e3,
        "ours_gbs": kv_bytes / ours / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 32768])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"{props.name}: copy bandwidth {bandwidth:.0f} GB/s (read + write)\n")
    print(
        "| batch | context | split-KV | ours (ms) | GB/s | % of copy | SDPA contiguous (ms) "
        "| ours / SDPA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for context in args.contexts:
            if batch * context > 256 * 32768 // 4:  # keep the pool under ~8 GiB
                continue
            r = case(batch, context, props.multi_processor_count)
            print(
                f"| {batch} | {context} | {'yes' if r['splits'] else 'no'} | {r['ours_ms']:.3f} | "
                f"{r['ours_gbs']:.0f} | {100 * r['ours_gbs'] / bandwidth:.0f}% | "
                f"{r['sdpa_ms']:.3f} | {r['ours_ms'] / r['sdpa_ms']:.2f} |"
            )


if __name__ == "__main__":
    main()

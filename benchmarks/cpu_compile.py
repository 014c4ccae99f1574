"""Does `torch.compile` (inductor on CPU) make kubellm's decode faster? One request of
the built-in model with its defaults, decoded eagerly and with the whole forward pass
compiled (the torch attention backend wrapped as an opaque custom op, so the graph
has no breaks); each in its own process, the compile time at the first step stated.

    python benchmarks/cpu_compile.py

Output tokens/s of a 64-token greedy reply, twice (the first compiled run still
recompiles as the block table grows; the second is steady).
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

MODES = ("eager", "compiled")


@torch.library.custom_op("kubellm_bench::attention", mutates_args=("kv_cache",))
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The torch backend over metadata rebuilt from tensors (the graph sees no lists)."""
    from kubellm.runtime.executor.platform.torch_attention import TorchAttentionBackend
    from kubellm.runtime.model.attention import AttentionMetadata

    query_lens, lens = query_start_loc.diff().tolist(), seq_lens.tolist()
    meta = AttentionMetadata(
        slot_mapping,
        query_start_loc,
        seq_lens,
        block_tables,
        block_size,
        max(query_lens),
        max(lens),
        query_lens,
        lens,
        [-1] * len(lens),
    )
    return TorchAttentionBackend().forward(query, key, value, kv_cache, meta, scale).contiguous()


@attention.register_fake
def _(
    query,
    key,
    value,
    kv_cache,
    slot_mapping,
    query_start_loc,
    seq_lens,
    block_tables,
    block_size,
    scale,
):
    return torch.empty_like(query)


class OpaqueAttention:
    """An attention backend that is one custom op call."""

    supports_cuda_graphs = False

    def forward(self, query, key, value, kv_cache, meta, scale):
        return attention(
            query,
            key,
            value,
            kv_cache,
            meta.slot_mapping,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.block_size,
            scale,
        )


def measure(mode: str) -> None:
    from kubellm.runtime import LLM, SamplingParams

    torch.set_num_threads(2)
    llm = LLM()
    if mode == "compiled":
        model = llm.engine.runner.model
        for layer in model.layers:
            layer.self_attn.backend = OpaqueAttention()
        model.forward = torch.compile(model.forward)
    started = time.perf_counter()
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    print(f"first steps (compile): {time.perf_counter() - started:.1f} s")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for run in (1, 2):
        started = time.perf_counter()
        llm.generate([list(range(100, 120))], params)
        print(f"run {run}: {64 / (time.perf_counter() - started):.1f} tok/s", flush=True)


def main() -> None:
    if len(sys.argv) == 2:
        measure(sys.argv[1])
        return
    for mode in MODES:
        result = subprocess.run(
            [sys.executable, __file__, mode], capture_output=True, text=True, check=True
        )
        lines = [line for line in result.stdout.splitlines() if line[:1] in "fr"]
        print(f"{mode}: " + "; ".join(lines), flush=True)


if __name__ == "__main__":
    main()

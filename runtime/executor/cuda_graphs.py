"""Decode steps replayed from CUDA graphs.

A decode step of a small model is a few hundred short kernels (per layer: norms,
projections, rotary embedding, the cache write, attention, the MLP), and at small batches
the GPU finishes each one before the CPU has launched the next. A CUDA graph records the
launches once and replays them all with one call.

A graph replays fixed shapes at fixed addresses, so the step's inputs are copied into
static buffers sized for the largest captured batch, and a batch of n runs as the
smallest captured size that holds it. The padding rows write their K/V nowhere (slot -1)
and attend over one token of whatever block their table row names; their outputs are
never read. Each graph's attention metadata carries the bounds of any step it replays
(one query token, the longest context served), which is all the Triton backend needs to
choose its launch; its split-KV kernel cuts each request's context itself.

With pipeline stages each rank records its own stage: a stage after the first reads the
hidden states and residual it received from static buffers too, and a stage before the
last hands back its own (copied out of the graph's buffers, since they are sent on
while the next step replays).
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from kubellm.runtime.executor.step_plan import cdiv
from kubellm.runtime.model.attention import AttentionMetadata
from kubellm.runtime.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

LARGEST_GRAPH = 512  # bigger decode batches are compute-bound: launches no longer matter


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to the first that holds `max_num_seqs`
    (at most LARGEST_GRAPH): padding wastes at most 15 rows."""
    sizes = [1, 2, 4, 8, *range(16, LARGEST_GRAPH + 1, 16)]
    wanted = min(max_num_seqs, LARGEST_GRAPH)
    return sizes[: bisect.bisect_left(sizes, wanted) + 1]


class DecodeGraphs:
    """Static buffers for decode batches up to `sizes[-1]`, and a graph per size once
    `capture()` ran (CUDA only). Without a graph for a size, `run` executes the same
    padded step eagerly: how the padding is tested on a CPU."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        max_seq_len: int,
        block_size: int,
    ) -> None:
        device = kv_caches[0].device
        largest = sizes[-1]
        self.model, self.kv_caches, self.sizes = model, kv_caches, sizes
        stage = model.stage
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        max_blocks = cdiv(max_seq_len, block_size)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int64, device=device)
        dtype = model.held_layers[0].input_layernorm.weight.dtype
        rows = (largest, model.config.hidden_size)
        self.hidden = torch.zeros(rows, dtype=dtype, device=device)
        # the stage before's hidden states and residual (after the first stage), and this
        # stage's residual out (before the last)
        self.carried = (
            None
            if stage.is_first
            else tuple(torch.zeros(rows, dtype=dtype, device=device) for _ in range(2))
        )
        self.residual = None if stage.is_last else torch.zeros(rows, dtype=dtype, device=device)
        query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.metadata = {
            size: AttentionMetadata(
                slot_mapping=self.slot_mapping[:size],
                query_start_loc=query_start_loc[: size + 1],
                seq_lens=self.seq_lens[:size],
                block_tables=self.block_tables[:size],
                block_size=block_size,
                max_query_len=1,
                max_seq_len=max_seq_len,
                query_lens_cpu=[],
                seq_lens_cpu=[],
                contiguous_starts=[],
            )
            for size in sizes
        }
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.steps_run = 0  # decode steps that went through the static buffers

    def covers(self, meta: AttentionMetadata) -> bool:
        """A decode-only step (one new token per request) of a size and context length
        that were prepared."""
        return (
            meta.max_query_len == 1
            and meta.seq_lens.shape[0] <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per size, largest first so the smaller ones reuse its memory."""
        started = time.perf_counter()
        before = torch.cuda.memory_allocated()
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # compiles the Triton kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(size)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured %d CUDA graphs for decode batches of 1 to %d in %.1f s (%.0f MiB)",
            len(self.graphs),
            self.sizes[-1],
            time.perf_counter() - started,
            (torch.cuda.memory_allocated() - before) / 2**20,
        )

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """A decode step of n requests, as the model's forward returns it: the final
        hidden states [n, hidden_size] (the last stage), or this stage's hidden states and
        residual (an earlier one, continuing from the stage before's `carried`)."""
        n = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        if self.carried is not None:
            for buffer, values in zip(self.carried, carried):
                buffer[:n].copy_(values)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].fill_(1)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        self.steps_run += 1
        graph = self.graphs.get(size)
        if graph is None:
            self._forward(size)
        else:
            graph.replay()
        if self.residual is None:
            return self.hidden[:n]
        return self.hidden[:n].clone(), self.residual[:n].clone()

    def _forward(self, size: int) -> None:
        carried = None if self.carried is None else tuple(b[:size] for b in self.carried)
        out = self.model(
            self.input_ids[:size],
            self.positions[:size],
            self.kv_caches,
            self.metadata[size],
            carried,
        )
        if self.residual is None:
            self.hidden[:size] = out
        else:
            self.hidden[:size], self.residual[:size] = out

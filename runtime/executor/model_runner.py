"""The model runner: one per tensor-parallel rank, each running the same code on its shard.

It owns its whole life, as nano-vllm's does: build the model, load this rank's shard of
the weights, size the KV pool (on CUDA after a profiling pass at the largest step; every
rank then takes the smallest count any rank can hold), allocate this rank's KV cache
(its heads only), capture CUDA graphs for decode, and run steps. A step is a `StepPlan`
turned into one flat, unpadded batch. It knows nothing of requests or the scheduler:
rank 0's sampler reaches the profiling pass only as `draw`, a function of the logits.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch

from kubellm.runtime.config import EngineConfig, ModelConfig
from kubellm.runtime.executor.cuda_graphs import DecodeGraphs, graph_batch_sizes
from kubellm.runtime.executor.distributed import (
    ONE_STAGE,
    SINGLE_PROCESS,
    SINGLE_RANK,
    Parallel,
    PipelineStage,
    TensorParallel,
)
from kubellm.runtime.executor.platform import Platform
from kubellm.runtime.executor.step_plan import StepPlan
from kubellm.runtime.model.attention import AttentionMetadata
from kubellm.runtime.model.llama import LlamaForCausalLM
from kubellm.runtime.model.quantized import WeightLayouts, all_dense, resident_bytes
from kubellm.runtime.model.source import ModelSource
from kubellm.runtime.model.weights import load_weights

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        max_model_len: int,
        platform: Platform,
        parallel: Parallel = SINGLE_PROCESS,
        draw: Callable[[torch.Tensor], list[int]] | None = None,
    ) -> None:
        """`draw`: rank 0's sampler at its most demanding, run on the profiling pass's
        logits so that the KV pool leaves room for it too."""
        self.config, self.parallel, self.max_model_len = config, parallel, max_model_len
        self.draw = draw
        self.block_size = config.block_size
        self.device = platform.device_of(config.local_rank(parallel.rank))
        self.dtype, self.kv_dtype = platform.dtype, platform.kv_dtype
        layouts = source.layouts(packed_vocabulary=platform.packs_vocabulary)
        self.model = build_model(
            source.config, max_model_len, platform, self.device, parallel.tp, layouts, parallel.pp
        )
        load_weights(self.model, source.tensors())
        platform.prepare(self.model)
        logger.info(
            "rank %d weights: %.0f MiB resident",
            parallel.rank,
            resident_bytes(self.model) / 2**20,
        )
        self.kv_caches: list[torch.Tensor] = []
        self._logits: deque[torch.Tensor | None] = deque()  # launched steps', last stage
        self._sending: tuple = ((), None)  # the last sends' works and their tensors
        self.num_blocks = parallel.min(config.num_kv_blocks or self._blocks_from_memory())
        config.check_pool_fits(max_model_len, self.num_blocks)
        self.kv_caches = self.allocate_kv(self.num_blocks)
        self.decode_graphs: DecodeGraphs | None = None
        if not config.enforce_eager and platform.captures_cuda_graphs(self.model.attention_backend):
            self.use_decode_graphs()  # each rank its own stage's

    def allocate_kv(self, num_blocks: int) -> list[torch.Tensor]:
        """One [2, blocks, block_size, this rank's KV heads, head_dim] tensor per layer."""
        attention = self.model.held_layers[0].self_attn
        shape = (2, num_blocks, self.block_size, attention.num_kv_heads, attention.head_dim)
        # Zeros, not empty: masked-out slots are still multiplied by zero weights.
        return [
            torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            for _ in self.model.held_layers
        ]

    def kv_block_bytes(self) -> int:
        """Bytes one block of `allocate_kv`'s caches takes on this rank, over all layers."""
        attention = self.model.held_layers[0].self_attn
        per_layer = 2 * self.block_size * attention.num_kv_heads * attention.head_dim
        return len(self.model.held_layers) * per_layer * self.kv_dtype.itemsize

    def _blocks_from_memory(self) -> int:
        """CPU: `kv_cache_memory_gib`. CUDA: what `gpu_memory_utilization` of the device
        leaves once the weights are in and the largest step's activations are set aside
        (measured by a profiling forward pass, on every rank)."""
        bytes_per_block = self.kv_block_bytes()
        if self.device.type != "cuda":
            return max(1, int(self.config.kv_cache_memory_gib * 2**30) // bytes_per_block)
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        activations = self.activation_peak_bytes(tokens, self.config.max_num_seqs)
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free  # weights, CUDA context, other processes
        budget = int(total * self.config.gpu_memory_utilization) - used - activations
        logger.info(
            "rank %d KV pool budget: %.1f GiB (%.0f%% of %.1f GiB, minus %.1f GiB in use and "
            "%.1f GiB of activations at %d tokens over %d sequences)",
            self.parallel.rank,
            budget / 2**30,
            100 * self.config.gpu_memory_utilization,
            total / 2**30,
            used / 2**30,
            activations / 2**30,
            tokens,
            self.config.max_num_seqs,
        )
        if budget <= 0:
            raise ValueError(
                "no GPU memory is left for the KV cache: raise gpu_memory_utilization "
                "or lower max_num_batched_tokens"
            )
        return max(1, budget // bytes_per_block)

    def profile_step(self, num_tokens: int, num_seqs: int) -> list[int] | None:
        """The largest step (`StepPlan.for_profile`) on a throwaway KV cache just big
        enough for it, then `draw` on its logits; the tokens drawn (None on the other
        ranks, whose shards of the logits went to rank 0). Every rank runs the same
        pass, its collectives included."""
        plan, num_blocks = StepPlan.for_profile(num_tokens, num_seqs, self.block_size)
        kept, self.kv_caches = self.kv_caches, self.allocate_kv(num_blocks)
        try:
            logits, _ = self.execute(plan)
            return None if logits is None or self.draw is None else self.draw(logits)
        finally:
            self.kv_caches = kept

    def activation_peak_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """CUDA only: bytes the largest step allocates beyond what is already allocated
        (the throwaway cache not counted: the real pool is sized separately)."""
        _, num_blocks = StepPlan.for_profile(num_tokens, num_seqs, self.block_size)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.profile_step(num_tokens, num_seqs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return max(0, peak - num_blocks * self.kv_block_bytes())

    def use_decode_graphs(self, capture: bool = True) -> None:
        """Run decode steps through static buffers, replayed from CUDA graphs when
        `capture` (CUDA only); without, eagerly: how the buffers are tested on a CPU."""
        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            graph_batch_sizes(self.config.max_num_seqs),
            self.max_model_len,
            self.block_size,
        )
        if capture:
            graphs.capture()
        self.decode_graphs = graphs

    def execute(self, plan: StepPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`launch` then `collect`: what every rank but the engine's runs for each plan."""
        self.launch(plan)
        return self.collect(plan)

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> None:
        """Run this rank's stage of a step: on what the stage before sent (after the
        first), into the stage after (before the last; sent without waiting) or into
        logits held for `collect` (the last stage)."""
        input_ids, positions, meta = self._inputs(plan)
        stage = self.parallel.pp
        carried = None if stage.is_first else stage.receive(self._carried_like(len(input_ids)))
        if self.decode_graphs is not None and self.decode_graphs.covers(meta):
            hidden = self.decode_graphs.run(input_ids, positions, meta, carried)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta, carried)
        if stage.is_last:
            rows = self._tensor(plan.logits_indices)
            if len(plan.prompt_indices):
                rows = torch.cat([rows, self._tensor(plan.prompt_indices)])
            self._logits.append(self.model.compute_logits(hidden[rows]))  # one gather
        else:
            for work in self._sending[0]:
                work.wait()
            hidden = tuple(t.contiguous() for t in hidden)
            self._sending = (stage.send(hidden), hidden)

    def collect(self, plan: StepPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The oldest launched step's logits. On rank 0: fp32 logits of the sampling rows
        [num_sampling, vocab] in plan order, and of the prompt rows to score (None when
        there are none); the last stage sent them when the stages are several. On the
        other ranks (None, None)."""
        logits = self._logits.popleft() if self.parallel.pp.is_last else None
        num_sampling = len(plan.logits_indices)
        num_rows = num_sampling + len(plan.prompt_indices)
        logits = self.parallel.logits_to_driver(
            logits, num_rows, self.model.config.vocab_size, self.dtype
        )
        if logits is None:
            return None, None
        logits = logits.float()
        if not len(plan.prompt_indices):
            return logits, None
        return logits[:num_sampling], logits[num_sampling:]

    def _carried_like(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers for the stage before's hidden states and residual."""
        shape = (num_tokens, self.model.config.hidden_size)
        return tuple(torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2))

    def _inputs(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        seq_lens = plan.seq_lens.tolist()
        query_lens = plan.query_lens
        meta = AttentionMetadata(
            slot_mapping=self._tensor(plan.slot_mapping),
            query_start_loc=self._tensor(plan.query_start_loc),
            seq_lens=self._tensor(plan.seq_lens),
            block_tables=self._tensor(plan.block_tables),
            block_size=self.block_size,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            contiguous_starts=plan.contiguous_starts,
        )
        return self._tensor(plan.input_ids), self._tensor(plan.positions), meta

    def _tensor(self, values) -> torch.Tensor:
        """A numpy array on the device (numpy is ~4x faster than torch.tensor on lists)."""
        return torch.from_numpy(values).to(self.device)


def build_model(
    cfg: ModelConfig,
    max_positions: int,
    platform: Platform,
    device: torch.device,
    tp: TensorParallel = SINGLE_RANK,
    layouts: WeightLayouts = all_dense,
    stage: PipelineStage = ONE_STAGE,
) -> LlamaForCausalLM:
    """This rank's shard of the model with uninitialized weights (the loader fills them),
    its attention and layer ops the platform's."""
    with torch.device("meta"):
        model = LlamaForCausalLM(
            cfg,
            max_positions,
            platform.attention(),
            tp,
            layouts,
            platform.layer_ops(),
            stage,
        )
    model = model.to_empty(device=device).to(platform.dtype).eval()
    model.tie_weights()
    model.rope.to(torch.float32).reset()
    return model

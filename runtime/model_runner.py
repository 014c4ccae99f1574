"""Turns a scheduled step into one flat, unpadded batch and runs the model on it."""

from __future__ import annotations

import numpy as np
import torch

from kubellm.runtime.attention import AttentionMetadata, get_backend
from kubellm.runtime.config import ModelConfig
from kubellm.runtime.cuda_graphs import DecodeGraphs
from kubellm.runtime.model.llama import LlamaForCausalLM
from kubellm.runtime.scheduler import SchedulerOutput


class ModelRunner:
    """Owns the model and the KV cache tensors (one per layer)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        cfg: ModelConfig = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeros, not empty: masked-out slots are still multiplied by zero weights.
        self.kv_caches = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        ]
        self.decode_graphs: DecodeGraphs | None = None  # set when CUDA graphs are captured

    @staticmethod
    def build(
        cfg: ModelConfig,
        max_positions: int,
        attention_backend: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> LlamaForCausalLM:
        """The model with uninitialized weights (the loader fills them) on `device`."""
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg, max_positions, get_backend(attention_backend))
        model = model.to_empty(device=device).to(dtype).eval()
        model.tie_weights()
        model.rope.to(torch.float32).reset()
        return model

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (fp32) of the sampling requests [num_sampling, vocab], in scheduled order,
        and of the prompt positions that requests asked to score (`prompt_positions`, in
        scheduled order; None when none did)."""
        input_ids, positions, meta, logits_indices, prompt_indices = self._prepare(out)
        if self.decode_graphs is not None and self.decode_graphs.covers(meta):
            hidden = self.decode_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[logits_indices])
        if prompt_indices is None:
            return logits, None
        return logits, self.model.compute_logits(hidden[prompt_indices])

    def _prepare(self, out: SchedulerOutput):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        prompt_indices: list[int] = []
        bs = self.block_size
        for item in out.scheduled:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids += request.token_ids[start:end]
            positions += range(start, end)
            table = request.block_ids
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            query_start.append(query_start[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                logits_indices.append(query_start[-1] - 1)
            first_row = query_start[-2] - start
            prompt_indices += (first_row + p for p in item.prompt_positions)
        query_lens = [item.num_new_tokens for item in out.scheduled]
        max_blocks = max(-(-s // bs) for s in seq_lens)
        tables = [item.request.block_ids[:max_blocks] for item in out.scheduled]
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        tensor = self._tensor
        meta = AttentionMetadata(
            slot_mapping=tensor(slots, np.int64),
            query_start_loc=tensor(query_start, np.int32),
            seq_lens=tensor(seq_lens, np.int32),
            block_tables=tensor(padded, np.int64),
            block_size=bs,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            contiguous_starts=[_contiguous_start(t) for t in tables],
        )
        return (
            tensor(input_ids, np.int64),
            tensor(positions, np.int64),
            meta,
            tensor(logits_indices, np.int64),
            tensor(prompt_indices, np.int64) if prompt_indices else None,
        )

    def _tensor(self, values: list, dtype: type) -> torch.Tensor:
        """Python ints to a tensor on the device (through numpy: ~4x faster than
        torch.tensor on nested lists, which matters at hundreds of requests a step)."""
        return torch.from_numpy(np.array(values, dtype=dtype)).to(self.device)


def _contiguous_start(block_ids: list[int]) -> int:
    """The first block id if the ids are consecutive, else -1."""
    first = block_ids[0]
    if block_ids[-1] - first != len(block_ids) - 1:
        return -1
    return first if block_ids == list(range(first, first + len(block_ids))) else -1

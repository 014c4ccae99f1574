"""A compact Llama-family decoder over a flat batch (Llama 2/3, Mistral, SmolLM, Qwen2).

Q, K and V come from one fused projection, gate and up from another. Attention
goes through an `AttentionBackend`, which owns the paged KV cache's layout; a layer's
small ops through `LayerOps`. The platform (`executor/platform`) supplies both, the
quantized layers' products, and, where it has one, a layer's whole decode step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kubellm.runtime.config import ModelConfig
from kubellm.runtime.executor.distributed import (
    ONE_STAGE,
    SINGLE_RANK,
    PipelineStage,
    TensorParallel,
)
from kubellm.runtime.model.attention import AttentionBackend, AttentionMetadata
from kubellm.runtime.model.layer_ops import TORCH_OPS, LayerOps
from kubellm.runtime.model.parallel import (
    ColumnParallelLinear,
    MissingLayer,
    ParallelLMHead,
    Replicated,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
)
from kubellm.runtime.model.quantized import WeightLayouts, all_dense
from kubellm.runtime.model.rope import RopeTables, RotaryEmbedding


class RMSNorm(Replicated):
    def __init__(self, size: int, eps: float, ops: LayerOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed sum x + residual, and the sum (the next layer's residual)."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def qkv_shards(cfg: ModelConfig, tp: TensorParallel) -> list[Shard]:
    """This rank's rows of Q, K and V: its query heads, and the KV heads they read. With
    fewer KV heads than ranks each KV head is replicated on the ranks whose query heads
    use it (as vLLM does)."""
    dim = cfg.head_dim
    heads = cfg.num_heads // tp.size
    kv_heads = max(1, cfg.num_kv_heads // tp.size)
    first_kv = tp.rank * cfg.num_kv_heads // tp.size
    kv = Shard(cfg.num_kv_heads * dim, first_kv * dim, kv_heads * dim)
    return [Shard(cfg.num_heads * dim, tp.rank * heads * dim, heads * dim), kv, kv]


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        tp: TensorParallel,
        layouts: WeightLayouts,
        prefix: str,
        ops: LayerOps,
    ) -> None:
        super().__init__()
        self.ops = ops
        shards = qkv_shards(cfg, tp)
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = shards[0].size, shards[1].size
        self.num_heads = self.q_size // cfg.head_dim  # this rank's
        self.num_kv_heads = self.kv_size // cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, shards, cfg.attention_bias, layouts(prefix + "qkv_proj")
        )
        self.o_proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp, layouts(prefix + "o_proj")
        )
        self.scale = cfg.head_dim**-0.5
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeTables,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        heads, qk_size = self.num_heads + self.num_kv_heads, self.q_size + self.kv_size
        qk = self.ops.rotate(qkv[:, :qk_size].view(-1, heads, self.head_dim), rope)  # in one go
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, qk_size:].view(-1, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        tp: TensorParallel,
        layouts: WeightLayouts,
        prefix: str,
        ops: LayerOps,
    ) -> None:
        super().__init__()
        self.ops = ops
        shard = Shard.even(cfg.intermediate_size, tp)
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [shard, shard], False, layouts(prefix + "gate_up_proj")
        )
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, tp, layouts(prefix + "down_proj")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        tp: TensorParallel,
        layouts: WeightLayouts,
        prefix: str,
        ops: LayerOps,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, backend, tp, layouts, prefix + "self_attn.", ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, tp, layouts, prefix + "mlp.", ops)
        # The platform's form of this layer's decode step in one call, where it has one:
        # (the ops' decode step, kv_cache, x, residual) -> what `forward` returns.
        self.whole_decode: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x, residual, rope: RopeTables, kv_cache, meta, step: Any = None):
        """(this layer's MLP output, the residual stream before it): the next layer (or
        the final norm) adds the two as its norm's first step, as vLLM's layers do."""
        if step is not None and self.whole_decode is not None:
            return self.whole_decode(step, kv_cache, x, residual)
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """One rank's shard of the model (the whole model with one rank); `layouts` says
    which linear layers keep quantized weights (by our module names). With several
    pipeline stages a rank holds its stage's layers only (the others are `MissingLayer`s),
    the first stage the embedding, and the last the final norm and the output head (and
    the embedding too when the head is tied to it)."""

    def __init__(
        self,
        cfg: ModelConfig,
        max_positions: int,
        backend: AttentionBackend,
        tp: TensorParallel = SINGLE_RANK,
        layouts: WeightLayouts = all_dense,
        ops: LayerOps = TORCH_OPS,
        stage: PipelineStage = ONE_STAGE,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.tp = tp
        self.stage = stage
        self.attention_backend = backend
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        tied, first, last = cfg.tie_word_embeddings, stage.is_first, stage.is_last
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, layouts("embed_tokens"))
            if first or (tied and last)
            else MissingLayer()
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, backend, tp, layouts, f"layers.{i}.", ops)
            if stage.holds(i)
            else MissingLayer()
            for i in range(cfg.num_layers)
        )
        self.held_layers = [layer for layer in self.layers if isinstance(layer, DecoderLayer)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops) if last else MissingLayer()
        head = "embed_tokens" if tied else "lm_head"
        self.lm_head = (
            ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, layouts(head))
            if last
            else MissingLayer()
        )
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head (again after a device move that split them)."""
        if self.config.tie_word_embeddings and self.stage.is_last:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        carried: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states of every new token: [num_tokens, hidden_size]. A stage
        after the first continues from `carried`, the stage before's (hidden states,
        residual); a stage before the last returns its own (kv_caches: the held layers')."""
        dtype = self.held_layers[0].input_layernorm.weight.dtype
        if carried is None:
            x, residual = self.embed_tokens(input_ids).to(dtype), None  # quantized: fp32 rows
        else:
            x, residual = carried
        rope = self.rope.tables(positions, dtype)  # once for every layer
        step = None
        if any(layer.whole_decode is not None for layer in self.held_layers):
            step = self.ops.decode_step(rope, meta, kv_caches[0], len(input_ids))
        for layer, kv_cache in zip(self.held_layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta, step)
        if not self.stage.is_last:
            return x, residual
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [rows, vocab] in the activations' dtype on the stage's first rank
        (gathered from every rank of its group); None elsewhere. The sampler takes them
        in fp32: upcast where they are sampled, so a stage sends half the bytes in bf16."""
        return self.lm_head(hidden)

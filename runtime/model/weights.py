"""Put Hugging Face-named tensors into our model, fusing QKV and gate/up."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from kubellm.runtime.model.llama import LlamaForCausalLM

# HF name suffix -> (our parameter suffix, shard index within the fused parameter)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy every tensor in; fail if any parameter of the model was left unset."""
    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    shard_sizes = _shard_sizes(model)
    rows_filled = dict.fromkeys(params, 0)
    for hf_name, tensor in tensors:
        target, offset, size = _target(hf_name, shard_sizes)
        if target is None or (tied and target == "lm_head.weight"):
            continue
        if target not in params:
            raise ValueError(f"weight {hf_name!r} has no place in this model")
        param = params[target]
        rows = size or param.shape[0]
        with torch.no_grad():
            param.narrow(0, offset, rows).copy_(tensor)
        rows_filled[target] += rows
    if tied:
        rows_filled.pop("lm_head.weight", None)
    missing = sorted(name for name, rows in rows_filled.items() if rows < params[name].shape[0])
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}")


def _shard_sizes(model: LlamaForCausalLM) -> dict[str, list[int]]:
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "self_attn.qkv_proj": [q, kv, kv],
        "mlp.gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size],
    }


def _target(hf_name: str, shard_sizes: dict[str, list[int]]) -> tuple[str | None, int, int]:
    """Our parameter name for an HF tensor, and the row range it fills (0 size: all rows)."""
    if "rotary_emb" in hf_name:
        return None, 0, 0
    match = _LAYER.match(hf_name)
    if match is None:
        return hf_name.removeprefix("model."), 0, 0
    layer, module, kind = match.groups()
    if module not in _FUSED:
        return f"layers.{layer}.{module}.{kind}", 0, 0
    fused, shard = _FUSED[module]
    sizes = shard_sizes[fused]
    return f"layers.{layer}.{fused}.{kind}", sum(sizes[:shard]), sizes[shard]

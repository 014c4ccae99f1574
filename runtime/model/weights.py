"""Put Hugging Face-named tensors into our model (this rank's shard of each), fusing QKV
and gate/up."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from kubellm.runtime.model.lazy_tensor import LazyTensor
from kubellm.runtime.model.llama import LlamaForCausalLM
from kubellm.runtime.model.parallel import MissingLayer

# HF module suffix -> (our module suffix, part index within the fused projection)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_NAME = re.compile(r"^(?:model\.)?(.+)\.(weight|bias)$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, LazyTensor]]) -> None:
    """Copy this rank's slice of every tensor in; fail if any weight was left unset."""
    modules = dict(model.named_modules())
    rows_needed = _loadable_rows(modules)
    tied = model.config.tie_word_embeddings
    rows_filled = dict.fromkeys(rows_needed, 0)
    for hf_name, tensor in tensors:
        target = _target(hf_name)
        if target is None or (tied and target[0] == "lm_head"):
            continue
        module_name, kind, part = target
        if _elsewhere(modules, module_name):  # another pipeline stage's
            continue
        if f"{module_name}.{kind}" not in rows_needed:
            raise ValueError(f"weight {hf_name!r} has no place in this model")
        try:
            rows_filled[f"{module_name}.{kind}"] += _load(modules[module_name], kind, part, tensor)
        except ValueError as exc:
            raise ValueError(f"weight {hf_name!r}: {exc}") from None
    if tied:
        rows_filled.pop("lm_head.weight", None)
    missing = sorted(name for name, rows in rows_filled.items() if rows < rows_needed[name])
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}")


def _elsewhere(modules: dict[str, nn.Module], module_name: str) -> bool:
    """Whether `module_name` is inside a `MissingLayer`: held by another pipeline stage."""
    parts = module_name.split(".")
    prefixes = (".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return any(isinstance(modules.get(prefix), MissingLayer) for prefix in prefixes)


def _loadable_rows(modules: dict[str, nn.Module]) -> dict[str, int]:
    """'<module>.weight' / '.bias' -> its rows, for every dense or quantized one."""
    rows = {}
    for name, module in modules.items():
        for kind in ("weight", "bias"):
            value = module._parameters.get(kind, module._modules.get(kind))
            if value is not None:
                rows[f"{name}.{kind}" if name else kind] = value.shape[0]
    return rows


def _load(module: nn.Module, kind: str, part: int, tensor: LazyTensor) -> int:
    load = getattr(module, "load", None)
    if load is None:
        raise ValueError(f"{type(module).__name__} takes no checkpoint tensor")
    return load(kind, part, tensor)


def hf_parts(module: str) -> list[str]:
    """The checkpoint's module names (model.layers.0.self_attn.q_proj, ...) that our
    module (layers.0.self_attn.qkv_proj) is made of."""
    layer = _LAYER.match(module)
    if layer is None:
        return [module if module == "lm_head" else f"model.{module}"]
    index, suffix = layer.groups()
    parts = [hf for hf, (ours, _) in _FUSED.items() if ours == suffix] or [suffix]
    return [f"model.layers.{index}.{part}" for part in parts]


def _target(hf_name: str) -> tuple[str, str, int] | None:
    """(our module name, 'weight' or 'bias', part of a fused projection) for an HF tensor."""
    match = _NAME.match(hf_name)
    if match is None or "rotary_emb" in hf_name:
        return None
    name, kind = match.groups()
    layer = _LAYER.match(name)
    if layer is None or layer.group(2) not in _FUSED:
        return name, kind, 0
    fused, part = _FUSED[layer.group(2)]
    return f"layers.{layer.group(1)}.{fused}", kind, part

"""Read a GGUF file: its Llama-family config and its tensors under HF names, Q4_0, Q4_1,
Q4_K and Q8_0 ones kept as blocks (`GroupQuantized`), the others dequantized."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from kubellm.runtime.config import ModelConfig
from kubellm.runtime.model.quant_formats import GGUF_PACKED, from_gguf_blocks
from kubellm.runtime.model.quantized import GroupQuantized

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFModel:
    def __init__(self, path: str) -> None:
        self.path = path
        self.reader = GGUFReader(path)
        self.architecture = self.field("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def config(self) -> ModelConfig:
        arch = self.architecture
        hidden = self.field(f"{arch}.embedding_length")
        num_heads = self.field(f"{arch}.attention.head_count")
        tensor_names = {t.name for t in self.reader.tensors}
        eos = self.field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            vocab_size=len(self.reader.fields["tokenizer.ggml.tokens"].data),
            hidden_size=hidden,
            intermediate_size=self.field(f"{arch}.feed_forward_length"),
            num_layers=self.field(f"{arch}.block_count"),
            num_heads=num_heads,
            num_kv_heads=self.field(f"{arch}.attention.head_count_kv", num_heads),
            head_dim=self.field(f"{arch}.attention.key_length", hidden // num_heads),
            rms_norm_eps=self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=self.field(f"{arch}.rope.freq_base", 10000.0),
            max_position_embeddings=self.field(f"{arch}.context_length", 4096),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            eos_token_ids=() if eos is None else (eos,),
        )

    def tensor_types(self) -> dict[str, str]:
        """HF name -> GGUF tensor type name (Q4_1, F32, ...)."""
        names = ((_hf_name(t.name), t.tensor_type.name) for t in self.reader.tensors)
        return {name: kind for name, kind in names if name is not None}

    def tensors(self) -> Iterator[tuple[str, torch.Tensor | GroupQuantized]]:
        """(HF name, tensor) for every weight in HF's layout: a kept block type as
        `GroupQuantized`, any other dequantized to fp32."""
        cfg = self.config()
        permuted = self.architecture != "qwen2"  # llama.cpp permutes Q/K rows for llama only
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            shape = tuple(reversed(t.shape.tolist()))
            if t.tensor_type.name in GGUF_PACKED:
                tensor = from_gguf_blocks(t.data, t.tensor_type.name, shape[0])
            else:
                array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
                tensor = torch.from_numpy(array.reshape(shape).copy())
            if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _unpermute_rotary(tensor, cfg.num_heads)
            elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _unpermute_rotary(tensor, cfg.num_kv_heads)
            yield name, tensor


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
        return None  # e.g. rope_freqs: we compute frequencies ourselves
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"


def _unpermute_rotary(
    weight: torch.Tensor | GroupQuantized, num_heads: int
) -> torch.Tensor | GroupQuantized:
    """llama.cpp stores Q/K rows interleaved for its rotary layout; undo it for HF's halves."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    order = torch.arange(rows).reshape(num_heads, half, 2).transpose(1, 2).reshape(rows)
    return weight.rows(order) if isinstance(weight, GroupQuantized) else weight[order]

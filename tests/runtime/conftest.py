"""Runtime fixtures: SmolLM2 (ours and the transformers oracle) and tiny random models."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from kubellm.runtime import LLM
from kubellm.runtime.model.source import builtin_gguf_path
from tests.runtime.quantized_checkpoints import act_order_gptq

from .pins import DEFAULTS, PINS, pinned

# Tiny Llama-family configs for transformers; random weights, saved as HF directories.
TINY_CONFIGS = {
    "gqa4-untied": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False
    ),
    "mha-tied": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True
    ),
    "gqa3-llama3-rope": dict(
        model_type="llama",
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2-bias": dict(
        model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
    ),
}


@pytest.fixture(scope="session")
def smollm2() -> LLM:
    """Our engine on the built-in model; small prefill chunks so long prompts are chunked."""
    return LLM(**pinned(max_num_batched_tokens=64, kv_cache_memory_gib=0.5))


@pytest.fixture(scope="session")
def smollm2_oracle():
    """transformers on the same GGUF weights, fp32."""
    from transformers import AutoModelForCausalLM

    path = builtin_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_oracle_greedy(smollm2_oracle):
    """transformers' greedy tokens on the built-in model, computed once per prompt."""
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_new_tokens)
        if key not in memo:
            memo[key] = hf_greedy(smollm2_oracle, prompt_ids, max_new_tokens)
        return memo[key]

    return greedy


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2):
    """Factory: name in TINY_CONFIGS -> a Hugging Face directory with random weights."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = _save_tiny_model(tmp_path_factory.mktemp(name), name, smollm2.tokenizer)
        return made[name]

    return make


@pytest.fixture(scope="session")
def quantized_tiny_dir(tmp_path_factory, smollm2) -> Path:
    """A tiny random Llama as a 4-bit GPTQ checkpoint (groups of 32; no act order, so
    tensor parallelism can split it)."""
    directory = tmp_path_factory.mktemp("tiny-gptq")
    return act_order_gptq(smollm2.tokenizer, directory, act_order=False)


@pytest.fixture(scope="session")
def model_for(tiny_model_dir, quantized_tiny_dir):
    """Factory: (settings, tiny config name) -> (model directory, the engine settings to
    build it with). "pinned": that tiny model under the suite's fp32 oracle pins;
    "defaults": the 4-bit tiny checkpoint under `make serve`'s settings (on CPUs with AVX2:
    kubellm's C kernels, int8-rounded activations, an fp16 KV cache)."""

    def pick(settings: str, name: str) -> tuple[str, dict[str, Any]]:
        if settings == "pinned":
            return str(tiny_model_dir(name)), PINS
        return str(quantized_tiny_dir), DEFAULTS

    return pick


def _save_tiny_model(directory: Path, name: str, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        max_position_embeddings=512,
        initializer_range=0.15,
        eos_token_id=tokenizer.eos_token_id,
        **spec,
    )
    torch.manual_seed(zlib.crc32(name.encode()))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_type == "qwen2":  # make the biases matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["model_type"] == model_type
    return directory


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' own forward and KV cache, EOS ignored."""
    generated: list[int] = []
    input_ids = torch.tensor([prompt_ids])
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            input_ids = torch.tensor([[token]])
    return generated

"""Quantized checkpoints of a tiny random Llama for the tests: GPTQ (symmetric and not)
and AWQ made by `auto-round` (real checkpoints, as users download them), an act-order
GPTQ one written here from the format's definition, and each one's dense twin (its
weights dequantized, saved as an ordinary fp32 checkpoint) for the oracles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
GROUP = 32
CALIBRATION = [" ".join(["the quick brown fox jumps over the lazy dog"] * 8)] * 16
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def random_llama(tokenizer, vocab_size: int | None = None):
    """The tiny Llama, its vocabulary the tokenizer's or its first `vocab_size` ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = vocab_size or len(tokenizer)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY)).eval()


def auto_round(tokenizer, directory: Path, fmt: str, sym: bool) -> Path:
    """`auto-round` (iters=0: round-to-nearest with its scale search) on the tiny model."""
    from auto_round import AutoRound

    model = random_llama(tokenizer)
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        bits=4,
        group_size=GROUP,
        sym=sym,
        iters=0,
        dataset=CALIBRATION,
        nsamples=16,
        seqlen=32,
    )
    rounder.quantize_and_save(str(directory), format=fmt)
    return next(p.parent for p in directory.rglob("config.json"))


def act_order_gptq(
    tokenizer,
    directory: Path,
    v2: bool = False,
    act_order: bool = True,
    vocab_size: int | None = None,
) -> Path:
    """GPTQ with desc_act, written from the definition: per layer a random order of the
    inputs (shared by the projections that read the same input, as GPTQ's Hessian order
    is), asymmetric 4-bit groups of GROUP inputs taken in that order. With `act_order`
    False, the inputs in their own order (desc_act false: shardable along the inputs)."""
    model = random_llama(tokenizer, vocab_size)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    generator = torch.Generator().manual_seed(1)
    state, orders = {}, {}
    for name, tensor in model.state_dict().items():
        module = name.removesuffix(".weight")
        if not any(module.endswith(linear) for linear in LINEARS):
            state[name] = tensor.contiguous()
            continue
        alone = module.endswith(("o_proj", "down_proj"))
        reads = module if alone else module.rsplit(".", 1)[0]  # q, k, v and gate, up share
        if reads not in orders:
            inputs = tensor.shape[1]
            shuffled = torch.randperm(inputs, generator=generator)
            orders[reads] = shuffled if act_order else torch.arange(inputs)
        state.update(quantize_gptq(module, tensor, orders[reads], v2))
    save_file(state, str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP,
        "desc_act": act_order,
        "sym": False,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def quantize_gptq(
    module: str, weight: torch.Tensor, order: torch.Tensor, v2: bool, group_size: int = GROUP
) -> dict[str, torch.Tensor]:
    """qweight [K/8, N] (row 8r + j at bits 4j), qzeros [G, N/8] (z, or z - 1 for v1),
    fp16 scales [G, N], g_idx [K]: input order[i] is in group i // group_size."""
    out_features, in_features = weight.shape
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group_size).to(torch.int32)
    groups = in_features // group_size
    scales = torch.empty(groups, out_features)
    zeros = torch.empty(groups, out_features, dtype=torch.int32)
    codes = torch.empty(in_features, out_features, dtype=torch.int32)
    for group in range(groups):
        members = (g_idx == group).nonzero().flatten()
        block = weight.T[members]  # [group_size, N]
        low, high = block.min(0).values.clamp(max=0), block.max(0).values.clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-6).half().float()
        zero = (-low / scale).round().clamp(0, 15).to(torch.int32)
        scales[group], zeros[group] = scale, zero
        codes[members] = (block / scale + zero).round().clamp(0, 15).to(torch.int32)
    stored_zeros = zeros if v2 else zeros - 1
    return {
        f"{module}.qweight": _pack(codes, dim=0),
        f"{module}.qzeros": _pack(stored_zeros & 15, dim=1),
        f"{module}.scales": scales.half(),
        f"{module}.g_idx": g_idx,
    }


def _pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values to an int32 along `dim`, value j at bits 4j."""
    moved = values.movedim(dim, -1).to(torch.int64)
    words = moved.reshape(*moved.shape[:-1], -1, 8)
    packed = sum(words[..., j] << (4 * j) for j in range(8))
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


def dense_twin(quantized: Path, directory: Path, dequantized: dict[str, torch.Tensor]) -> Path:
    """The same model as an ordinary fp32 checkpoint with `dequantized` as its linear
    weights (HF module name -> dense weight)."""
    directory.mkdir(parents=True, exist_ok=True)
    for file in quantized.iterdir():
        if file.suffix != ".safetensors" and file.is_file():
            shutil.copy(file, directory / file.name)
    state = {}
    for file in quantized.glob("*.safetensors"):
        for name, tensor in load_file(str(file)).items():
            if not name.endswith(("qweight", "qzeros", "scales", "g_idx")):
                state[name] = tensor.float().contiguous()
    state.update({f"{module}.weight": w.contiguous() for module, w in dequantized.items()})
    save_file(state, str(directory / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config))
    return directory

"""What a GPTQ or AWQ checkpoint's weights take in kubellm's runner against the same
model's bf16 weights: the built-in SmolLM2-135M rounded to 4 bits by `auto-round`
(iters=0: round-to-nearest with its scale search, on CPU), as GPTQ (symmetric) and AWQ
(asymmetric), groups of 64 (128 does not divide its 576 inputs), written to a temporary
directory, then each loaded by kubellm with its defaults; beside them the dense
checkpoint loaded in bf16.

    python benchmarks/quantized_memory.py

The bytes are measured on the loaded model (`quantized.resident_bytes`: every tensor it
keeps, each storage once), split into the decoder layers (whose projections GPTQ and
AWQ make 4-bit; their norms included) and the rest (the embedding, which is also the
tied output head, and the final norm: GPTQ and AWQ leave them dense).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from kubellm.runtime import LLM
from kubellm.runtime.model.quantized import QuantizedWeight, resident_bytes
from kubellm.runtime.model.source import builtin_gguf_path

GROUP = 64  # 128, the usual, does not divide this model's 576 inputs
MIB = 2**20
CALIBRATION = ["The quick brown fox jumps over the lazy dog. " * 16] * 8  # no hub here


def dense_checkpoint(directory: Path) -> Path:
    """The built-in GGUF as a Hugging Face fp32 checkpoint (transformers dequantizes it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    config = loaded.config  # a plain model: one loaded from GGUF won't save
    del config.quantization_config  # its {"quant_method": "gguf"}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def quantized_checkpoint(dense: Path, directory: Path, fmt: str, sym: bool) -> Path:
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(dense))
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        bits=4,
        group_size=GROUP,
        sym=sym,
        iters=0,
        dataset=CALIBRATION,
        nsamples=8,
        seqlen=64,
    )
    rounder.quantize_and_save(str(directory), format=fmt)
    return next(p.parent for p in directory.rglob("config.json"))


def weight_bytes(model: str, **settings) -> tuple[int, int]:
    """(bytes of the decoder layers, bytes of everything else) of the loaded model."""
    with LLM(model=model, max_model_len=512, kv_cache_memory_gib=0.1, **settings) as llm:
        net = llm.engine.runner.model
        total, layers = resident_bytes(net), resident_bytes(net.layers)
        assert any(isinstance(m, QuantizedWeight) for m in net.layers.modules()) == (
            "quantization" not in settings
        ), "a quantized checkpoint must load packed, the dense one dense"
    return layers, total - layers


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dense = dense_checkpoint(root / "dense")
        rows = {
            "dense, `--dtype bfloat16`": weight_bytes(
                str(dense), dtype="bfloat16", quantization="none"
            )
        }
        for name, fmt, sym in (("GPTQ sym", "auto_gptq", True), ("AWQ", "auto_awq", False)):
            directory = quantized_checkpoint(dense, root / fmt, fmt, sym)
            rows[f"{name}, defaults"] = weight_bytes(str(directory))
            rows[f"{name}, `--dtype bfloat16`"] = weight_bytes(str(directory), dtype="bfloat16")
    bf16_layers, bf16_rest = rows["dense, `--dtype bfloat16`"]
    print("| checkpoint, settings | decoder layers (of bf16's) | the rest | all (of bf16's) |")
    print("|---|---|---|---|")
    for name, (layers, rest) in rows.items():
        share, whole = layers / bf16_layers, (layers + rest) / (bf16_layers + bf16_rest)
        print(
            f"| {name} | {layers / MIB:.1f} MiB ({share:.2f}) | {rest / MIB:.1f} MiB | "
            f"{(layers + rest) / MIB:.1f} MiB ({whole:.2f}) |"
        )


if __name__ == "__main__":
    main()

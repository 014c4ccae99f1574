"""Offline decode speed of the built-in model on CPU by weight format, each in its own
process: its Q4_1 blocks dequantized at load (`--quantization none`) in fp32 or bf16, or
kept packed (the default) with exact fp32 products, bf16 activations, or what `--dtype
auto` picks on this CPU; and the weights' bytes resident in the runner.

    python benchmarks/cpu_weight_formats.py
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

MODES = {  # name -> (quantization, dtype)
    "dense fp32": ("none", "float32"),
    "dense bf16": ("none", "bfloat16"),
    "Q4_1 packed, fp32 exact (`--dtype float32`)": ("gguf", "float32"),
    "Q4_1 packed, bf16": ("gguf", "bfloat16"),
    "Q4_1 packed, `--dtype auto` (the default)": ("gguf", "auto"),
}
BATCHES = (1, 16)
TOKENS = 32


def measure(quantization: str, dtype: str) -> str:
    import torch

    from kubellm.runtime import LLM, SamplingParams
    from kubellm.runtime.model.quantized import resident_bytes

    torch.set_num_threads(2)
    llm = LLM(quantization=quantization, dtype=dtype)
    weight_bytes = resident_bytes(llm.engine.runner.model)
    rng = random.Random(0)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(rng.randint(16, 256))]
        for _ in range(max(BATCHES))
    ]
    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up
    speeds = []
    for batch in BATCHES:
        started = time.perf_counter()
        llm.generate(prompts[:batch], params)
        speeds.append(batch * TOKENS / (time.perf_counter() - started))
    cells = " | ".join(f"{s:.1f}" for s in speeds)
    return f"{cells} | {weight_bytes / 2**20:.0f} MiB"


def main() -> None:
    if len(sys.argv) == 3:  # one mode, in a fresh process
        print(measure(sys.argv[1], sys.argv[2]))
        return
    print(
        "| weights | " + " | ".join(f"{b} requests, tok/s" for b in BATCHES) + " | weight bytes |"
    )
    print("|---" * (len(BATCHES) + 2) + "|")
    for name, (quantization, dtype) in MODES.items():
        run = [sys.executable, __file__, quantization, dtype]
        line = subprocess.run(run, capture_output=True, text=True, check=True).stdout
        print(f"| {name} | {line.strip().splitlines()[-1]} |", flush=True)


if __name__ == "__main__":
    main()

"""Offline decode speed of the built-in model on CPU with different weight formats:
fp32, bf16, and weight-only int8 (torch._weight_int8pack_mm) with fp32 or bf16
activations. A measurement for BENCHMARKS.md, not a feature: int8 swaps each
nn.Linear's forward in place.

    python benchmarks/cpu_weight_formats.py fp32|bf16|int8-fp32|int8-bf16
"""

from __future__ import annotations

import random
import sys
import time

import torch

from kubellm.runtime import LLM, SamplingParams


def int8_weights(model: torch.nn.Module, activations: torch.dtype) -> None:
    """Per-output-channel symmetric int8 weights; activations cast to `activations`."""
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.detach().float()
        scales = (weight.abs().amax(1) / 127).clamp(min=1e-8)
        module.register_buffer("wq", (weight / scales[:, None]).round().to(torch.int8))
        module.register_buffer("sq", scales.to(activations))

        def forward(x: torch.Tensor, m: torch.nn.Linear = module) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1]).to(activations)
            y = torch._weight_int8pack_mm(flat, m.wq, m.sq)
            y = y if m.bias is None else y + m.bias
            return y.reshape(*x.shape[:-1], -1).to(x.dtype)

        module.forward = forward
        module.weight = None


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "fp32"
    dtype = "bfloat16" if mode.endswith("bf16") else "float32"
    llm = LLM(dtype=dtype)
    if mode.startswith("int8"):
        int8_weights(llm.engine.runner.model, getattr(torch, dtype))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(16, 256))]
               for _ in range(16)]  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up
    for batch in (1, 16):
        started = time.perf_counter()
        llm.generate(prompts[:batch], params)
        seconds = time.perf_counter() - started
        print(f"| {mode} | {batch} | {batch * 32 / seconds:.1f} |")


if __name__ == "__main__":
    main()

"""The built-in model under `make serve`'s defaults where kubellm's C kernels cannot be
built (this process runs with no C compiler and an empty kernel cache, so the library
cannot be built: torch's int4 kernel and attention): a 500-token prompt's prefill alone,
and greedy decode throughput at 1 and 16 requests. Run it on two commits to compare them.

    CC=false XDG_CACHE_HOME=$(mktemp -d) python benchmarks/fallback_path.py

Median seconds of 3 runs after a warm-up; decode as generated tokens per second of a
batch's whole run (each request 64 tokens after a 16-48-token prompt).
"""

from __future__ import annotations

import torch
from timing import cpu_model, median_seconds

from kubellm.kernels import cpu_library
from kubellm.runtime import LLM, SamplingParams

ONE_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
DECODE = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def main() -> None:
    reason = cpu_library.unavailable()
    assert reason is not None, "run with CC=false and an empty XDG_CACHE_HOME"
    llm = LLM(device="cpu", max_model_len=1024, enable_prefix_caching=False)
    dtype = str(llm.engine.runner.model.held_layers[0].input_layernorm.weight.dtype)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; {dtype}; kernels: {reason[:60]}\n")
    print("| measure | value |")
    print("|---|---|")
    prompt = [(37 * j) % 20000 + 300 for j in range(500)]
    prefill = median_seconds(lambda: llm.generate([prompt], ONE_TOKEN), repeats=3)
    print(f"| prefill of 500 tokens (s) | {prefill:.2f} |", flush=True)
    for batch in (1, 16):
        prompts = [
            [(11 * i + 7 * j) % 20000 + 300 for j in range(16 + 2 * i)] for i in range(batch)
        ]
        seconds = median_seconds(lambda p=prompts: llm.generate(p, DECODE), repeats=3)
        print(f"| {batch} x 64 tokens (tok/s) | {batch * 64 / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()

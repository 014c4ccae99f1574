"""What one decode step of the built-in model costs on CPU with kubellm's defaults: the
model runner's whole step, its forward pass and its logits, at 1, 16 and 64 running
requests, and how many aten ops one step calls (the host overhead that item 6 of issue
13 is about); beside it the same engine with torch's layer ops and attention backend
instead of kubellm's C kernels (the x86 platform's layer ops replaced by torch's for the
measurement), measured alternately in the same run.

    python benchmarks/decode_step.py

Each batch's requests get prompts of 16-256 tokens and are decoded 24 tokens first, so
the step measured is a pure decode step over realistic contexts. Median milliseconds of
20 runs of that same step (its K/V writes land on the same slots each time).
"""

from __future__ import annotations

import random

import torch
from timing import cpu_model, median_seconds
from torch.profiler import ProfilerActivity, profile

from kubellm.runtime import LLM, SamplingParams
from kubellm.runtime.executor.platform.base import Platform
from kubellm.runtime.executor.platform.x86 import X86Platform

BATCHES = (1, 16, 64)


def milliseconds(run) -> float:
    return median_seconds(run) * 1e3


def decode_plan(llm: LLM, batch: int, rng: random.Random):
    """A decode step of `batch` requests 24 tokens into their replies."""
    runner = llm.engine.runner
    plans = []
    launch = runner.launch
    runner.launch = lambda plan: plans.append(plan) or launch(plan)
    prompts = [
        [rng.randrange(100, 40000) for _ in range(rng.randint(16, 256))] for _ in range(batch)
    ]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=26, ignore_eos=True))
    runner.launch = launch
    return next(p for p in reversed(plans) if len(p.input_ids) == batch)


def engine(fused_cpu_ops: bool) -> LLM:
    """kubellm's defaults; with fused_cpu_ops False, torch's layer ops and attention."""
    if fused_cpu_ops:
        return LLM()
    chosen = X86Platform.layer_ops
    X86Platform.layer_ops = Platform.layer_ops
    try:
        return LLM(attention_backend="torch")
    finally:
        X86Platform.layer_ops = chosen


def main() -> None:
    torch.set_num_threads(2)
    model_name = cpu_model()
    print(f"CPU: {model_name}; torch {torch.__version__}; 2 threads; milliseconds (median)\n")
    engines = {"torch's ops": engine(False), "kubellm's C ops": engine(True)}
    print("| requests | ops | step | forward | logits | aten ops per step |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in BATCHES:
            for name, llm in engines.items():
                plan = decode_plan(llm, batch, random.Random(batch))
                step, forward, logits, ops = costs(llm.engine.runner, plan)
                print(
                    f"| {batch} | {name} | {step:.1f} | {forward:.1f} | {logits:.1f} | {ops:,} |",
                    flush=True,
                )


def costs(runner, plan) -> tuple[float, float, float, int]:
    """Milliseconds of the step, its forward pass and its logits; aten ops per step."""
    ids, positions, meta = runner._inputs(plan)
    hidden = runner.model(ids, positions, runner.kv_caches, meta)
    step = milliseconds(lambda: runner.execute(plan))
    forward = milliseconds(lambda: runner.model(ids, positions, runner.kv_caches, meta))
    logits = milliseconds(lambda: runner.model.compute_logits(hidden))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.execute(plan)
    return step, forward, logits, sum(event.count for event in prof.key_averages())


if __name__ == "__main__":
    main()

"""Host time per decode step: what the engine spends in Python around the model.

On a GPU a decode step of a small model takes a few milliseconds, and the host work
around it (scheduling, building the flat batch, appending tokens, detokenizing) runs
before and after it, not beside it. This measures that host work on CPU, with a
one-layer model so the forward pass stays small, at several decode batch sizes.

    python benchmarks/host_overhead.py [--batches 1 16 64 256] [--steps 30]

Each stage is timed by wrapping the engine's own methods for the measurement; the
model, logits and sampler columns are CPU compute that a GPU would do instead.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HOST_STAGES = ("schedule", "prepare", "update", "detokenize")
DEVICE_STAGES = ("model", "logits", "sampler")


def one_layer_model(directory: Path) -> Path:
    """SmolLM2's vocabulary and tokenizer, one small layer of random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kubellm.runtime.model.source import builtin_gguf_path

    gguf = builtin_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _timed(totals: dict[str, float], name: str, fn):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        totals[name] += time.perf_counter() - started
        return result

    return wrapper


def measure(model_dir: Path, batch: int, steps: int) -> dict[str, float]:
    """Milliseconds per decode step of `batch` running requests, per stage."""
    from kubellm.runtime import LLM, SamplingParams
    from kubellm.runtime.core.scheduler import SchedulerOutput

    llm = LLM(model=str(model_dir), device="cpu", max_num_seqs=batch, kv_cache_memory_gib=0.2)
    engine, totals = llm.engine, defaultdict(float)
    rng = random.Random(0)
    for i in range(batch):
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(100, 200))]
        params = SamplingParams(temperature=0.0, max_tokens=steps + 50, ignore_eos=True)
        engine.add_request(f"r{i}", *engine.admission.admit([prompt], params))
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running
    ):
        engine.step()  # prefill everything first: what follows is decode only
    stages = {  # prepare: the step's plan, then its tensors
        "schedule": (engine.scheduler, "schedule"),
        "prepare": (SchedulerOutput, "plan"),
        "inputs": (engine.runner, "_inputs"),
        "model": (engine.runner.model, "forward"),
        "logits": (engine.runner.model, "compute_logits"),
        "sampler": (engine, "sampler"),
        "update": (engine.scheduler, "update"),
        "detokenize": (engine, "_advance_text"),
    }
    plan_builder = SchedulerOutput.__dict__["plan"]  # a class attribute: put back after
    for name, (owner, attribute) in stages.items():
        stage = "prepare" if name == "inputs" else name
        setattr(owner, attribute, _timed(totals, stage, getattr(owner, attribute)))
    try:
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - started
    finally:
        SchedulerOutput.plan = plan_builder
    result = {name: 1e3 * totals[name] / steps for name in (*HOST_STAGES, *DEVICE_STAGES)}
    result["step"] = 1e3 * total / steps
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = one_layer_model(Path(scratch))
        rows = [(batch, measure(model_dir, batch, args.steps)) for batch in args.batches]
    columns = [*HOST_STAGES, *DEVICE_STAGES]
    print("\n| batch | " + " | ".join(columns) + " | other | step | host stages | per request |")
    print("|---" * (len(columns) + 5) + "|")
    for batch, r in rows:
        host = sum(r[name] for name in HOST_STAGES)
        other = r["step"] - sum(r[name] for name in columns)
        cells = " | ".join(f"{r[name]:.2f}" for name in columns)
        print(
            f"| {batch} | {cells} | {other:.2f} | {r['step']:.2f} | {host:.2f} | "
            f"{1e3 * host / batch:.1f} us |"
        )
    print("\nmilliseconds per decode step; other: the engine's glue and freeing the step's tensors")


if __name__ == "__main__":
    main()

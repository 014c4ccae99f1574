"""Offline engine throughput: kubellm against transformers, same weights, same run.

Workload (seeded): N requests with prompt lengths uniform in [32, 512] and output
lengths uniform in [64, 256], ignore_eos so every request produces its full output.
Baselines, both with transformers on the same dequantized weights:
  - one at a time: `generate` per request (measured on a subset, as a rate);
  - static batches: left-padded batches of --static-batch, each run until its longest
    output; only each request's own tokens count.

    python benchmarks/engine_throughput.py [--requests 64] [--device cpu|cuda]

On a GPU, issue 4's workload:
    python benchmarks/engine_throughput.py --device cuda --shape llama-3.2-1b \
        --requests 256 --prompt-range 100 1024 --output-range 100 1024 --generate-batch \
        --compare-eager
`--shape llama-3.2-1b` builds a model of Llama-3.2-1B's shape (16 layers, hidden 2048,
32/8 heads, llama3 RoPE scaling) with random bf16 weights and SmolLM2's vocabulary and
tokenizer (so its ids decode); `--generate-batch` adds transformers' own continuous
batching (`generate_batch`, all requests at the longest output; only each request's
own tokens count); `--compare-eager` adds kubellm with CUDA graphs off.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import resource
import tempfile
import time
from pathlib import Path

import torch


def make_workload(
    count: int, seed: int, vocab: int, prompt_range=(32, 512), output_range=(64, 256)
) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))],
            rng.randint(*output_range),
        )
        for _ in range(count)
    ]


def llama_3_2_1b_shaped(directory: Path) -> Path:
    """A random-weight model of Llama-3.2-1B's shape, saved as a HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kubellm.runtime.model.source import builtin_gguf_path

    path = builtin_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def run_kubellm(
    workload, device: str, dtype: str, model: str | None = None, enforce_eager: bool = False
) -> dict:
    from kubellm.runtime import LLM, SamplingParams

    context = max(len(prompt) + n for prompt, n in workload)  # not the model's 128k
    options = {
        "device": device,
        "dtype": dtype,
        "max_model_len": context,
        "enforce_eager": enforce_eager,
    }
    # the built-in model as transformers runs it: its Q4_1 blocks dequantized at load
    llm = LLM(model=model, **options) if model else LLM(quantization="none", **options)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up
    started = time.perf_counter()
    outputs = llm.generate([p for p, _ in workload], params)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == sum(n for _, n in workload)
    del llm, outputs
    _release_gpu_memory()  # the KV pool took most of the GPU: give it to the next system
    return {"tokens": tokens, "seconds": seconds, "peak_rss_gib": _peak_rss_gib()}


def load_transformers(device: str, dtype: str, directory: Path | None = None):
    from transformers import AutoModelForCausalLM

    from kubellm.runtime.model.source import builtin_gguf_path

    torch_dtype = {"auto": torch.float32 if device == "cpu" else torch.bfloat16}.get(
        dtype, getattr(torch, dtype, torch.float32)
    )
    if directory is not None:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch_dtype)
    else:
        path = builtin_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype
        )
    model.generation_config.eos_token_id = None
    return model.to(device).eval()


def hf_generate(model, prompts: list[list[int]], max_new: int, device: str) -> int:
    """Left-padded batch generate; returns the number of new positions produced per row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
        )
    return out.shape[1] - width


def run_one_at_a_time(model, workload, device: str) -> dict:
    started = time.perf_counter()
    tokens = 0
    for prompt, n in workload:
        produced = hf_generate(model, [prompt], n, device)
        assert produced == n
        tokens += n
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def run_static_batches(model, workload, batch: int, device: str) -> dict:
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(workload), batch):
        chunk = workload[i : i + batch]
        longest = max(n for _, n in chunk)
        assert hf_generate(model, [p for p, _ in chunk], longest, device) == longest
        tokens += sum(n for _, n in chunk)  # padding rows' extra tokens do not count
    return {"tokens": tokens, "seconds": time.perf_counter() - started}


def run_generate_batch(model, workload) -> dict:
    """transformers' continuous batching: one max_new_tokens for all (its API), so every
    request runs to the longest output; only each request's own tokens count."""
    from transformers import GenerationConfig

    longest = max(n for _, n in workload)
    config = GenerationConfig(
        max_new_tokens=longest, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    started = time.perf_counter()
    outputs = model.generate_batch([p for p, _ in workload], generation_config=config)
    seconds = time.perf_counter() - started
    assert len(outputs) == len(workload)
    return {"tokens": sum(n for _, n in workload), "seconds": seconds}


def _release_gpu_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--one-at-a-time-requests", type=int, default=8)
    parser.add_argument("--static-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=["smollm2", "llama-3.2-1b"], default="smollm2")
    parser.add_argument("--prompt-range", type=int, nargs=2, default=(32, 512))
    parser.add_argument("--output-range", type=int, nargs=2, default=(64, 256))
    parser.add_argument(
        "--generate-batch",
        action="store_true",
        help="add transformers' generate_batch as a baseline",
    )
    parser.add_argument(
        "--compare-eager",
        action="store_true",
        help="also run kubellm with enforce_eager (no CUDA graphs)",
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    workload = make_workload(
        args.requests, args.seed, 49152, tuple(args.prompt_range), tuple(args.output_range)
    )
    with tempfile.TemporaryDirectory() as scratch:
        directory = llama_3_2_1b_shaped(Path(scratch)) if args.shape != "smollm2" else None
        results = run_all(args, workload, directory)
    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


def run_all(args: argparse.Namespace, workload, directory: Path | None) -> dict:
    model_path = str(directory) if directory is not None else None
    results = {
        "kubellm (continuous batching)": run_kubellm(workload, args.device, args.dtype, model_path)
    }
    if args.compare_eager:
        results["kubellm --enforce-eager"] = run_kubellm(
            workload, args.device, args.dtype, model_path, enforce_eager=True
        )
    model = load_transformers(args.device, args.dtype, directory)
    if args.generate_batch:
        results["transformers generate_batch"] = run_generate_batch(model, workload)
    results[f"transformers static batches of {args.static_batch}"] = run_static_batches(
        model, workload, args.static_batch, args.device
    )
    results["transformers one at a time"] = run_one_at_a_time(
        model, workload[: args.one_at_a_time_requests], args.device
    )
    return results


def print_table(results: dict, args: argparse.Namespace) -> None:
    rates = {name: r["tokens"] / r["seconds"] for name, r in results.items()}
    ours = rates["kubellm (continuous batching)"]
    print(
        f"\nmachine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"device {args.device}, {args.requests} requests, seed {args.seed}"
    )
    print(
        f"| {'system':<36} | {'requests':>8} | {'output tokens':>13} | {'seconds':>8} "
        f"| {'tok/s':>7} | {'kubellm is':>10} |"
    )
    print(f"|{'-' * 38}|{'-' * 9}:|{'-' * 14}:|{'-' * 9}:|{'-' * 8}:|{'-' * 11}:|")
    for name, r in results.items():
        count = args.one_at_a_time_requests if "one at a time" in name else args.requests
        ratio = ours / rates[name]
        print(
            f"| {name:<36} | {count:>8} | {r['tokens']:>13} | {r['seconds']:>8.1f} "
            f"| {rates[name]:>7.1f} | {ratio:>9.2f}x |"
        )
    rss = results["kubellm (continuous batching)"]["peak_rss_gib"]
    print(f"\nkubellm peak RSS (before transformers was loaded): {rss:.2f} GiB")


if __name__ == "__main__":
    main()

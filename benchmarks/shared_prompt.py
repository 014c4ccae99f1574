"""n sequences of one prompt: the prompt is prefilled once, then shared through the prefix
cache; against the same engine with prefix caching off (each sequence prefills it).

    python benchmarks/shared_prompt.py [--prompt-tokens 1000] [--n 8] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import time


def run(caching: bool, prompt: list[int], n: int, max_tokens: int) -> tuple[float, int]:
    from kubellm.runtime import LLM, SamplingParams

    llm = LLM(enable_prefix_caching=caching, kv_cache_memory_gib=0.5)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))  # warm-up
    params = SamplingParams(n=n, temperature=0.8, seed=1, max_tokens=max_tokens, ignore_eos=True)
    before = llm.engine.scheduler.num_computed_tokens
    started = time.perf_counter()
    llm.generate([prompt], params)
    return time.perf_counter() - started, llm.engine.scheduler.num_computed_tokens - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    prompt = [(7 * i) % 5000 + 100 for i in range(args.prompt_tokens)]
    rows = {caching: run(caching, prompt, args.n, args.max_tokens) for caching in (True, False)}
    print(f"\n{args.prompt_tokens}-token prompt, n={args.n}, {args.max_tokens} tokens each\n")
    print("| prefix caching | tokens computed | seconds | speed-up |")
    print("|---|---|---|---|")
    for caching, (seconds, computed) in rows.items():
        print(
            f"| {'on' if caching else 'off'} | {computed} | {seconds:.2f} | "
            f"{rows[False][0] / seconds:.2f}x |"
        )


if __name__ == "__main__":
    main()

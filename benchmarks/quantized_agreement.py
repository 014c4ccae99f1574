"""How far the quantized path's fast products stray from the fp32 oracle: the built-in
model's Q4_1 layers and Q8_0 embedding kept packed, with bf16 activations and with what
`--dtype auto` picks on this CPU (on one without fast bf16: fp32 activations, the
quantized CPU kernel rounding its inputs: to int8 per 32 inputs in kubellm's, to bf16 in
torch's int4 kernel), against the same weights dequantized to fp32. The packed engines
run steps of at most 32 tokens, so every product is a kernel's (a larger step rebuilds
the dense weight, which is exact in fp32).

    python benchmarks/quantized_agreement.py

The oracle writes 32 greedy tokens for each of 8 prompts; the bf16 engine scores the
same text (prompt logprobs, teacher-forced), so every position is compared on the same
context: top-1 agreement (the bf16 engine's most likely token is the oracle's) and the
largest gap between the two engines' logprobs of the oracle's token.
"""

from __future__ import annotations

from kubellm.runtime import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "1, 2, 3, 4,",
    "Water boils at",
    "The quick brown fox",
    "SELECT * FROM",
    "In 1492, Columbus",
]
TOKENS = 32


def scored(llm: LLM, texts: list[list[int]]) -> list[list]:
    """Each text's prompt logprobs (with the top token) at every position but the first."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    return [out.prompt_logprobs[1:] for out in llm.generate(texts, params)]


def main() -> None:
    oracle = LLM(quantization="none", dtype="float32", kv_cache_memory_gib=0.5)
    prompts = [oracle.engine.tokenizer.encode(p) for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    texts = [p + o.outputs[0].token_ids for p, o in zip(prompts, oracle.generate(prompts, greedy))]
    expected = scored(oracle, texts)
    oracle.shutdown()
    print("| activations | top-1 agreement | largest logprob gap on the oracle's token |")
    print("|---|---|---|")
    for dtype in ("bfloat16", "auto"):
        with LLM(
            quantization="gguf", dtype=dtype, kv_cache_memory_gib=0.5, max_num_batched_tokens=32
        ) as packed:
            agree, total, gap = compare(prompts, expected, scored(packed, texts))
        print(f"| {dtype} | {agree}/{total} ({100 * agree / total:.1f}%) | {gap:.3f} |")


def compare(
    prompts: list[list[int]], expected: list[list], got: list[list]
) -> tuple[int, int, float]:
    """(positions whose top token is the oracle's, positions, largest logprob gap)."""
    agree = total = 0
    gap = 0.0
    for prompt, want, have in zip(prompts, expected, got):
        for position in range(len(prompt) - 1, len(want)):  # the 32 written tokens
            total += 1
            best = max(have[position].top, key=have[position].top.get)
            agree += best == want[position].token_id
            gap = max(gap, abs(have[position].logprob - want[position].logprob))
    return agree, total, gap


if __name__ == "__main__":
    main()

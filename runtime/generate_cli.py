"""`kubellm generate`: run prompts through the engine offline and print the results."""

from __future__ import annotations

import argparse
import os
import time

from kubellm.runtime.engine_flags import add_engine_flags, engine_settings, with_environment
from kubellm.runtime.logs import LEVELS, configure_logging

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give me three tips for a good night's sleep.",
]


def parse_args(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    """Its own flags and the engine's (each also $KUBELLM_<NAME>: flags win)."""
    parser = argparse.ArgumentParser(prog="kubellm generate", description=__doc__)
    parser.add_argument("prompts", nargs="*", help="prompts (default: a few demo prompts)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LEVELS)
    add_engine_flags(parser)
    return with_environment(parser, environ).parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv, dict(os.environ))
    configure_logging(args.log_level)
    from kubellm.runtime import LLM, SamplingParams

    llm = LLM(**engine_settings(args))
    prompts = args.prompts or DEMO_PROMPTS
    texts = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        if args.chat
        else p
        for p in prompts
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    started = time.perf_counter()
    outputs = llm.generate(texts, params)
    seconds = time.perf_counter() - started
    for prompt, output in zip(prompts, outputs):
        print(f"--- {prompt!r}\n{output.outputs[0].text}\n")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f"{len(prompts)} prompts, {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tok/s)"
    )
    return 0

"""What structured output costs: 16 concurrent streams constrained by a JSON schema
against 16 unconstrained ones, in the same run, on the same `kubellm serve`.

    python benchmarks/structured_output.py [--clients 16] [--rounds 2]

Both sides stream chat replies from the built-in model; the unconstrained side asks for
as many tokens as the constrained replies took on average, so both decode alike. Prints
output tokens per second of each and their ratio (issue 14's target: constrained
>= 90% of unconstrained).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "facts": {"type": "array", "minItems": 3, "maxItems": 6,
                  "items": {"type": "string", "maxLength": 60}},
        "population": {"type": "integer", "minimum": 0, "maximum": 50_000_000},
    },
    "required": ["city", "facts", "population"],
    "additionalProperties": False,
}  # fmt: skip
QUESTIONS = [f"Describe city number {i} of Europe as JSON, with some facts." for i in range(64)]


async def run(client: openai.AsyncOpenAI, clients: int, rounds: int, constrained: bool,
              max_tokens: int) -> tuple[int, float]:  # fmt: skip
    """(completion tokens, seconds) of `rounds` waves of `clients` concurrent streams."""
    extra = {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "city", "schema": SCHEMA}}}  # fmt: skip
    if not constrained:
        extra = {"extra_body": {"ignore_eos": True, "min_tokens": max_tokens}}

    async def one(question: str) -> int:
        stream = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": question}], stream=True,
            max_tokens=max_tokens, temperature=0.7, seed=1,
            stream_options={"include_usage": True}, **extra,
        )  # fmt: skip
        tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    started = time.perf_counter()
    total = 0
    for r in range(rounds):
        batch = QUESTIONS[r * clients : (r + 1) * clients]
        total += sum(await asyncio.gather(*(one(q) for q in batch)))
    return total, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "kubellm.runtime.serve", "--served-model-name", "bench",
         "--port", str(args.port), "--max-model-len", "2048", "--kv-cache-memory-gib", "1",
         "--log-level", "warning"],
    )  # fmt: skip
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600)
        asyncio.run(run(client, 2, 1, True, 300))  # warm-up (and the schema's compilation)
        tokens, seconds = asyncio.run(run(client, args.clients, args.rounds, True, 300))
        per_reply = max(1, tokens // (args.clients * args.rounds))
        free_tokens, free_seconds = asyncio.run(
            run(client, args.clients, args.rounds, False, per_reply)
        )
    finally:
        server.terminate()
        server.wait(60)
    constrained, free = tokens / seconds, free_tokens / free_seconds
    print(f"\n{args.clients} concurrent streams x {args.rounds} rounds, "
          f"{per_reply} tokens per reply on average\n")  # fmt: skip
    print("| streams | output tokens | seconds | tok/s |\n|---|---|---|---|")
    print(f"| json_schema | {tokens} | {seconds:.1f} | {constrained:.1f} |")
    print(f"| unconstrained | {free_tokens} | {free_seconds:.1f} | {free:.1f} |")
    print(f"\nconstrained / unconstrained: {100 * constrained / free:.0f}%")
    print(json.dumps({"constrained_tok_s": constrained, "free_tok_s": free}))


if __name__ == "__main__":
    main()

"""What structured output costs: 16 concurrent streams constrained by a JSON schema
against 16 unconstrained ones, in the same run, on the same `kubellm serve`.

    python benchmarks/structured_output.py [--clients 16] [--rounds 2]

Both sides stream chat replies from the built-in model; each unconstrained reply is made
exactly as long as the constrained reply to the same question, so both sides decode the
same batches and only the constraint differs. Prints
output tokens per second of each and their ratio (issue 14's target: constrained
>= 90% of unconstrained).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import openai
from launch import free_port, start

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "facts": {
            "type": "array",
            "minItems": 3,
            "maxItems": 6,
            "items": {"type": "string", "maxLength": 60},
        },
        "population": {"type": "integer", "minimum": 0, "maximum": 50_000_000},
    },
    "required": ["city", "facts", "population"],
    "additionalProperties": False,
}
QUESTIONS = [f"Describe city number {i} of Europe as JSON, with some facts." for i in range(64)]


async def run(
    url: str, clients: int, rounds: int, lengths: list[int] | None
) -> tuple[list[int], float]:
    """Tokens of each reply and the seconds of `rounds` waves of `clients` concurrent
    streams: constrained by SCHEMA (`lengths` None), or unconstrained with exactly these
    reply lengths, so both sides decode the same number of tokens per stream."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=600)

    async def one(index: int) -> int:
        if lengths is None:
            extra = {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "city", "schema": SCHEMA},
                },
                "max_tokens": 300,
            }
        else:
            extra = {
                "max_tokens": lengths[index],
                "extra_body": {"ignore_eos": True, "min_tokens": lengths[index]},
            }
        stream = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": QUESTIONS[index]}],
            stream=True,
            temperature=0.7,
            seed=1,
            stream_options={"include_usage": True},
            **extra,
        )
        tokens = 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    started = time.perf_counter()
    counts: list[int] = []
    for r in range(rounds):
        counts += await asyncio.gather(*(one(i) for i in range(r * clients, (r + 1) * clients)))
    seconds = time.perf_counter() - started
    await client.close()
    return counts, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / "kubellm-structured-output-server.log"
    server = start(
        [
            sys.executable,
            "-P",
            "-m",
            "kubellm.runtime.serve",
            "--served-model-name",
            "bench",
            "--port",
            str(port),
            "--max-model-len",
            "2048",
            "--kv-cache-memory-gib",
            "1",
            "--log-level",
            "warning",
        ],
        port,
        log,
    )
    try:
        asyncio.run(run(url, 2, 1, None))  # warm-up (and the schema's compilation)
        lengths, seconds = asyncio.run(run(url, args.clients, args.rounds, None))
        free_lengths, free_seconds = asyncio.run(run(url, args.clients, args.rounds, lengths))
        tokens, free_tokens = sum(lengths), sum(free_lengths)
    finally:
        server.terminate()
        server.wait(60)
    constrained, free = tokens / seconds, free_tokens / free_seconds
    print(
        f"\n{args.clients} concurrent streams x {args.rounds} rounds, "
        f"{tokens / len(lengths):.0f} tokens per reply on average (the same lengths on "
        f"both sides)\n"
    )
    print("| streams | output tokens | seconds | tok/s |\n|---|---|---|---|")
    print(f"| json_schema | {tokens} | {seconds:.1f} | {constrained:.1f} |")
    print(f"| unconstrained | {free_tokens} | {free_seconds:.1f} | {free:.1f} |")
    print(f"\nconstrained / unconstrained: {100 * constrained / free:.0f}%")
    print(json.dumps({"constrained_tok_s": constrained, "free_tok_s": free}))


if __name__ == "__main__":
    main()

"""Load generator for any OpenAI-compatible /v1/completions endpoint (like `vllm bench serve`).

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \
        --concurrency 16 --num-requests 64 --max-seconds 120 [--json out.json]

Requests come from a seeded synthetic dataset (prompt and output lengths drawn from
ranges; prompts are random common words, about one token each) or a JSONL file of
{"prompt": ..., "max_tokens": ...}. Each is streamed, with `ignore_eos`/`min_tokens` so
it produces its full output where the server supports that. Load is a fixed
concurrency or a Poisson arrival rate; the run stops at --num-requests or --max-seconds
(in-flight requests are then cancelled and their tokens so far still count).
Loopback only: this is a benchmark of the server, not of a network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

WORDS = (  # noqa: SIM905 (a word list reads best as text)
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an "
    "each which she do how their if will up other about out many then them these so some "
    "her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me "
    "back give most very after thing our just name good sentence man think say great "
    "where help through much before line right too mean old any same tell boy follow "
    "came want show "
).split()


@dataclass
class Request:
    prompt: str
    max_tokens: int


@dataclass
class Result:
    output_tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    completed: bool = False
    error: str | None = None


def synthetic(
    count: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]
) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_range))),
            rng.randint(*output_range),
        )
        for _ in range(count)
    ]


def from_jsonl(path: str, count: int, default_max_tokens: int) -> list[Request]:
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = (rows * (count // max(len(rows), 1) + 1))[:count]
    return [Request(r["prompt"], int(r.get("max_tokens", default_max_tokens))) for r in rows]


async def stream_one(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    request: Request,
    ignore_eos: bool,
    result: Result,
) -> None:
    """Fill `result` as the stream arrives (so a cancelled request keeps what it got)."""
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body.update(ignore_eos=True, min_tokens=request.max_tokens)
    started = last = time.perf_counter()
    async with client.stream("POST", url, json=body, timeout=None) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage")
            if chunk.get("choices") and _has_token(chunk["choices"][0]):
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - started
                else:
                    result.itls.append(now - last)
                last = now
                result.output_tokens += 1
            if usage and usage.get("completion_tokens"):
                result.output_tokens = max(result.output_tokens, usage["completion_tokens"])
    result.e2e = time.perf_counter() - started
    result.completed = True


def _has_token(choice: dict) -> bool:
    """A chunk that carries a generated token (text, or a finish with no text is not one)."""
    return bool(choice.get("text")) or (choice.get("finish_reason") is None)


async def run(
    base_url: str,
    model: str,
    requests: list[Request],
    concurrency: int | None,
    rate: float | None,
    max_seconds: float,
    ignore_eos: bool,
    fresh_connections: bool,
    seed: int = 0,
) -> dict:
    host = urlparse(base_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"loopback only: {base_url}")
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    shared = httpx.AsyncClient(limits=limits)
    results = [Result() for _ in requests]
    gate = asyncio.Semaphore(concurrency or len(requests))

    async def one(i: int) -> None:
        async with gate:
            try:
                if fresh_connections:  # llama.cpp's streams can break a reused connection
                    async with httpx.AsyncClient() as client:
                        await stream_one(client, url, model, requests[i], ignore_eos, results[i])
                else:
                    await stream_one(shared, url, model, requests[i], ignore_eos, results[i])
            except httpx.HTTPError as exc:
                results[i].error = f"{type(exc).__name__}: {exc}"

    started = time.perf_counter()
    tasks = []
    arrivals = random.Random(seed)
    for i in range(len(requests)):
        tasks.append(asyncio.create_task(one(i)))
        if rate:
            await asyncio.sleep(arrivals.expovariate(rate))
    _, pending = await asyncio.wait(
        tasks, timeout=max(0.0, max_seconds - (time.perf_counter() - started))
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    elapsed = time.perf_counter() - started
    await shared.aclose()
    return summarize(results, elapsed, concurrency, rate)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def summarize(
    results: list[Result], elapsed: float, concurrency: int | None, rate: float | None
) -> dict:
    completed = [r for r in results if r.completed]
    output_tokens = sum(r.output_tokens for r in results)
    return {
        "concurrency": concurrency,
        "request_rate": rate,
        "elapsed_s": elapsed,
        "requests_sent": sum(1 for r in results if r.ttft is not None or r.completed or r.error),
        "completed": len(completed),
        "errors": sum(1 for r in results if r.error),
        "error_samples": [r.error for r in results if r.error][:3],
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed if elapsed else 0.0,
        "requests_per_s": len(completed) / elapsed if elapsed else 0.0,
        "ttft_s": _percentiles([r.ttft for r in results if r.ttft is not None]),
        "itl_s": _percentiles([x for r in results for x in r.itls]),
        "e2e_s": _percentiles([r.e2e for r in completed if r.e2e is not None]),
    }


def format_table(rows: list[dict], label: str = "server") -> str:
    header = (
        f"| {label} | conc. | done | err | out tok/s | req/s | TTFT p50 / p90 / p99 (s) "
        f"| ITL p50 / p90 / p99 (ms) | E2E p50 (s) |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        t, i, e = row["ttft_s"], row["itl_s"], row["e2e_s"]
        lines.append(
            f"| {row.get('server', '-')} | {row['concurrency'] or row['request_rate']} "
            f"| {row['completed']} | {row['errors']} | {row['output_tokens_per_s']:.1f} "
            f"| {row['requests_per_s']:.2f} | {_fmt(t, 1)} | {_fmt(i, 1000)} "
            f"| {_fmt1(e['p50'])} |"
        )
    return "\n".join(lines)


def _fmt(stats: dict, scale: float) -> str:
    return " / ".join(_fmt1(stats[k], scale) for k in ("p50", "p90", "p99"))


def _fmt1(value: float | None, scale: float = 1) -> str:
    return "-" if value is None else f"{value * scale:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=16)
    load.add_argument("--request-rate", type=float, help="Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-words", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    p.add_argument("--jsonl", help="read prompts from this JSONL file instead")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--fresh-connections", action="store_true", help="one connection per request")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args()
    if args.jsonl:
        requests = from_jsonl(args.jsonl, args.num_requests, args.output_tokens[1])
    else:
        requests = synthetic(
            args.num_requests, args.seed, tuple(args.prompt_words), tuple(args.output_tokens)
        )
    concurrency = None if args.request_rate else args.concurrency
    summary = asyncio.run(
        run(
            args.base_url,
            args.model,
            requests,
            concurrency,
            args.request_rate,
            args.max_seconds,
            not args.no_ignore_eos,
            args.fresh_connections,
            args.seed,
        )
    )
    summary["server"] = args.base_url
    print(format_table([summary], "endpoint"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()

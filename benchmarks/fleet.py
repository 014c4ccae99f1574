"""Three `kubellm serve` replicas, a multi-tenant multi-turn chat workload, three ways of
spreading it: `kubellm route --policy prefix`, `kubellm route --policy round-robin`, and
the client cycling through the replicas itself (the seed guides' balancer).

    python benchmarks/fleet.py [--tenants 6] [--users 3] [--turns 3] [--kv-blocks 200]

Each tenant has a system prompt of about --system-words tokens; each of its users holds
a conversation of --turns turns (each turn sent once the previous reply has arrived,
the conversation so far included). Every conversation starts at a seeded random time
within the first --spread seconds. Each replica's KV pool (--kv-blocks blocks of 16
tokens) holds a few tenants' system prompts, not all of them. The replicas are started
afresh for each way (cold caches), one thread each. The prefix-cache hit rate is the
replicas' own (`kubellm:prefix_cache_hits` over `..._queries`, prompt tokens); TTFT is
the client's, to the first streamed token; output tok/s is over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kubellm.router.policy import LOAD_FACTOR

sys.path.insert(0, str(Path(__file__).parent))
from launch import free_port, start
from serve import WORDS
from timing import cpu_model

MODEL = "smollm2-135m-instruct"
WAYS = ("prefix", "round-robin", "client round-robin")
KUBELLM = [sys.executable, "-P", "-m", "kubellm"]


@dataclass
class Turn:
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Conversation:
    system: str
    questions: list[str]
    start_at: float
    turns: list[Turn] = field(default_factory=list)


def workload(args: argparse.Namespace) -> list[Conversation]:
    rng = random.Random(args.seed)

    def words(count: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(count))

    systems = [
        f"You are assistant number {t}. {words(args.system_words)}" for t in range(args.tenants)
    ]
    conversations = []
    for system in systems:
        for _ in range(args.users):
            questions = [words(args.question_words) for _ in range(args.turns)]
            conversations.append(Conversation(system, questions, rng.uniform(0, args.spread)))
    return conversations


async def converse(
    client: httpx.AsyncClient, url_for, conversation: Conversation, max_tokens: int, origin: float
) -> None:
    await asyncio.sleep(max(0.0, origin + conversation.start_at - time.perf_counter()))
    messages = [{"role": "system", "content": conversation.system}]
    for question in conversation.questions:
        messages.append({"role": "user", "content": question})
        turn = Turn()
        conversation.turns.append(turn)
        reply = await _stream(client, url_for(), messages, max_tokens, turn)
        if turn.error:
            return
        messages.append({"role": "assistant", "content": reply})


async def _stream(
    client: httpx.AsyncClient, base_url: str, messages: list[dict], max_tokens: int, turn: Turn
) -> str:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
        "min_tokens": max_tokens,
    }
    text, started = [], time.perf_counter()
    try:
        async with client.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                turn.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return ""
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    turn.error = str(chunk["error"])
                    return ""
                delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                if delta:
                    turn.ttft = turn.ttft or time.perf_counter() - started
                    turn.tokens += 1
                    text.append(delta)
    except httpx.HTTPError as exc:
        turn.error = f"{type(exc).__name__}: {exc}"
    return "".join(text)


def prefix_counts(urls: list[str]) -> tuple[float, float]:
    """(hits, queries) in prompt tokens, summed over the replicas."""
    hits = queries = 0.0
    for url in urls:
        text = httpx.get(url + "/metrics", timeout=10).text
        hits += _metric(text, "kubellm:prefix_cache_hits_total")
        queries += _metric(text, "kubellm:prefix_cache_queries_total")
    return hits, queries


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@contextmanager
def replicas(count: int, kv_blocks: int, logs: Path, base_port: int):
    """`base_port`: the replicas listen on base_port + i (0: free ports), so that the
    router's ring, which hashes their addresses, places the tenants alike in every run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
    procs, urls = [], []
    try:
        for i in range(count):
            port = base_port + i if base_port else free_port()
            command = [
                *KUBELLM,
                "serve",
                "--port",
                str(port),
                "--num-kv-blocks",
                str(kv_blocks),
                "--max-model-len",
                "2048",
            ]
            procs.append(start(command, port, logs / f"replica-{i}.log", env))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:  # warm each up: the first request pays one-time costs
            body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
            httpx.post(url + "/v1/completions", json=body, timeout=120).raise_for_status()
        yield urls
    finally:
        _stop(procs)


@contextmanager
def router(policy: str, urls: list[str], logs: Path, load_factor: float):
    port = free_port()
    command = [
        *KUBELLM,
        "route",
        "--port",
        str(port),
        "--policy",
        policy,
        "--load-factor",
        str(load_factor),
    ]
    for url in urls:
        command += ["--replica", url]
    proc = start(command, port, logs / f"router-{policy}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while _ready_replicas(base) < len(urls):
            if time.monotonic() > deadline:
                raise RuntimeError("the router never saw every replica ready")
            time.sleep(0.2)
        yield base
    finally:
        _stop([proc])


def _ready_replicas(base: str) -> int:
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(
        float(v)
        for v in re.findall(r"^kubellm:router_replica_ready\{.*\} (\S+)$", text, re.MULTILINE)
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def drive(conversations: list[Conversation], url_for, max_tokens: int) -> float:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        origin = time.perf_counter()
        await asyncio.gather(
            *(converse(client, url_for, c, max_tokens, origin) for c in conversations)
        )
        return time.perf_counter() - origin


def run_way(way: str, args: argparse.Namespace, logs: Path) -> dict:
    conversations = workload(args)
    with replicas(args.replicas, args.kv_blocks, logs, args.base_port) as urls:
        before = prefix_counts(urls)
        if way == "client round-robin":
            turn = iter(range(10**9))
            elapsed = asyncio.run(
                drive(conversations, lambda: urls[next(turn) % len(urls)], args.max_tokens)
            )
            split, spilled = "in turn", 0
        else:
            with router(way, urls, logs, args.load_factor) as base:
                elapsed = asyncio.run(drive(conversations, lambda: base, args.max_tokens))
                split, spilled = routed(base)
        after = prefix_counts(urls)
    row = summarize(way, conversations, elapsed, before, after)
    return {**row, "split": split, "spilled": spilled}


def routed(base: str) -> tuple[str, int]:
    """The router's own account: requests per replica (most first) and spilled decisions."""
    text = httpx.get(base + "/metrics", timeout=10).text
    samples = dict(re.findall(r"^kubellm:router_(\S+) (\S+)$", text, re.MULTILINE))
    counts = sorted(
        (int(float(v)) for k, v in samples.items() if k.startswith("requests_total{")), reverse=True
    )
    spilled = int(float(samples.get('decisions_total{reason="spilled"}', 0)))
    return "/".join(map(str, counts)), spilled


def summarize(
    way: str,
    conversations: list[Conversation],
    elapsed: float,
    before: tuple[float, float],
    after: tuple[float, float],
) -> dict:
    turns = [t for c in conversations for t in c.turns]
    ttfts = sorted(t.ttft for t in turns if t.ttft is not None and not t.error)
    queries = after[1] - before[1]
    return {
        "way": way,
        "requests": len(turns),
        "errors": sum(1 for t in turns if t.error),
        "error_samples": [t.error for t in turns if t.error][:3],
        "hit_rate": (after[0] - before[0]) / queries if queries else 0.0,
        "ttft_p50": _quantile(ttfts, 0.5),
        "ttft_p90": _quantile(ttfts, 0.9),
        "ttft_mean": statistics.fmean(ttfts) if ttfts else None,
        "output_tok_s": sum(t.tokens for t in turns) / elapsed,
        "elapsed_s": elapsed,
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["way"] == "round-robin"), None)
    lines = [
        "| routing | requests (per replica; spilled) | errors | prefix hit rate "
        "| TTFT p50 / p90 (s) | output tok/s | vs round-robin: TTFT p50 / p90, hit rate, "
        "tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['way']} | {r['requests']} ({r['split']}; {r['spilled']}) | {r['errors']} "
            f"| {r['hit_rate']:.1%} "
            f"| {r['ttft_p50']:.2f} / {r['ttft_p90']:.2f} | {r['output_tok_s']:.1f} "
            f"| {_ratios(r, base)} |"
        )
    return "\n".join(lines)


def _ratios(row: dict, base: dict | None) -> str:
    if base is None:
        return "-"
    ratio = lambda key: row[key] / max(base[key], 1e-9)  # noqa: E731
    return (
        f"{ratio('ttft_p50'):.2f}x / {ratio('ttft_p90'):.2f}x, {ratio('hit_rate'):.2f}x, "
        f"{ratio('output_tok_s'):.2f}x"
    )


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets for `prefix` against `round-robin`, each met or missed."""
    p = next(r for r in rows if r["way"] == "prefix")
    b = next(r for r in rows if r["way"] == "round-robin")
    checks = [
        ("TTFT p50 at most half", p["ttft_p50"] <= 0.5 * b["ttft_p50"]),
        ("TTFT p90 not higher", p["ttft_p90"] <= b["ttft_p90"]),
        ("hit rate at least 1.3x", p["hit_rate"] >= 1.3 * b["hit_rate"]),
        ("output tok/s at least 1.3x", p["output_tok_s"] >= 1.3 * b["output_tok_s"]),
    ]
    return [f"- {name}: {'met' if ok else 'MISSED'}" for name, ok in checks]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--tenants", type=int, default=6)
    p.add_argument("--users", type=int, default=3, help="per tenant")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-words", type=int, default=1000)
    p.add_argument("--question-words", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-blocks", type=int, default=200, help="per replica, 16 tokens each")
    p.add_argument("--spread", type=float, default=10.0, help="seconds over which to start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--base-port",
        type=int,
        default=18100,
        help="replicas on this port and the next (0: free ports)",
    )
    p.add_argument("--load-factor", type=float, default=LOAD_FACTOR, help="the router's")
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="kubellm-fleet-"))
    rows = []
    for way in args.ways:
        rows.append(run_way(way, args, logs))
        print(f"{way}: done in {rows[-1]['elapsed_s']:.0f} s", file=sys.stderr, flush=True)
    setup = (
        f"{args.replicas} replicas, one thread each, {args.kv_blocks} KV blocks each, "
        f"load factor {args.load_factor:g}; {args.tenants} tenants x {args.users} users x "
        f"{args.turns} turns, ~{args.system_words}-token system prompts, "
        f"{args.max_tokens} tokens per reply"
    )
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; {setup}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    if {"prefix", "round-robin"} <= {r["way"] for r in rows}:
        print("\nTargets (prefix against round-robin):")
        print("\n".join(targets(rows)))


if __name__ == "__main__":
    main()

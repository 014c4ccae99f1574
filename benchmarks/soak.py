"""A bounded soak of `kubellm serve` on 127.0.0.1: mixed traffic for a few minutes, then
check that nothing broke or leaked.

    python benchmarks/soak.py [--seconds 180] [--model smollm2-135m-instruct]

Traffic (seeded): plain and streamed completions and chats, n > 1, streams the client
hangs up on mid-generation and mid-prefill, prompts exactly at the context limit and
just over it, bad requests (bad values, unknown model, malformed JSON), in phases of
4, 16, 32 and 8 concurrent clients. Every request has a deadline; one that misses it
counts as hung. At the end: every status as expected (no unexpected 5xx), no hung
request, nothing running or waiting, the KV cache back to 0%, and the server's RSS
growth. Loopback only; bounded in time and in requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from launch import free_port, start

MAX_MODEL_LEN = 512
PHASES = (4, 16, 32, 8)  # concurrent clients, one phase after another
REQUEST_DEADLINE = 120.0  # seconds; longer is a hung request
MAX_REQUESTS = 20_000
KINDS = (
    "plain",
    "stream",
    "chat",
    "n",
    "hangup",
    "hangup-prefill",
    "at-limit",
    "over-limit",
    "bad-value",
    "bad-model",
    "bad-json",
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("kubellm:") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values


class Soak:
    def __init__(self, url: str, model: str, seed: int) -> None:
        self.url, self.model = url, model
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.hung = 0
        self.sent = 0

    def _body(self, **extra) -> dict:
        return {"model": self.model, "temperature": self.rng.choice([0, 0.8]), **extra}

    async def one(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.choice(KINDS)
        self.sent += 1
        try:
            await asyncio.wait_for(self._run(client, kind), REQUEST_DEADLINE)
        except TimeoutError:
            self.hung += 1
            self.unexpected.append(f"{kind}: no answer in {REQUEST_DEADLINE:.0f} s")

    async def _run(self, client: httpx.AsyncClient, kind: str) -> None:
        words = " ".join(self.rng.choice(["data", "pods", "cache", "token"]) for _ in range(20))
        completions, chat = self.url + "/v1/completions", self.url + "/v1/chat/completions"
        if kind == "plain":
            await self._expect(
                client, kind, completions, self._body(prompt=words, max_tokens=24), 200
            )
        elif kind == "stream":
            await self._stream(
                client,
                kind,
                completions,
                self._body(prompt=words, max_tokens=32, stream=True),
                None,
            )
        elif kind == "chat":
            messages = [{"role": "user", "content": words}]
            await self._expect(
                client, kind, chat, self._body(messages=messages, max_tokens=16), 200
            )
        elif kind == "n":
            await self._expect(
                client, kind, completions, self._body(prompt=words, n=3, max_tokens=8), 200
            )
        elif kind == "hangup":
            await self._stream(
                client, kind, completions, self._body(prompt=words, max_tokens=200, stream=True), 3
            )
        elif kind == "hangup-prefill":  # a long prompt, gone before its first token
            prompt = [self.rng.randrange(100, 40000) for _ in range(MAX_MODEL_LEN - 8)]
            await self._stream(
                client, kind, completions, self._body(prompt=prompt, max_tokens=4, stream=True), 0
            )
        elif kind == "at-limit":
            prompt = [self.rng.randrange(100, 40000) for _ in range(MAX_MODEL_LEN - 4)]
            await self._expect(
                client, kind, completions, self._body(prompt=prompt, max_tokens=4), 200
            )
        elif kind == "over-limit":
            prompt = [self.rng.randrange(100, 40000) for _ in range(MAX_MODEL_LEN)]
            await self._expect(
                client, kind, completions, self._body(prompt=prompt, max_tokens=4), 400
            )
        elif kind == "bad-value":
            body = self._body(prompt=words, max_tokens=4)
            await self._expect(client, kind, completions, dict(body, temperature=-1), 400)
        elif kind == "bad-model":
            body = dict(self._body(prompt=words, max_tokens=4), model="nope")
            await self._expect(client, kind, completions, body, 404)
        else:
            response = await client.post(
                completions, content=b"{not json", headers={"content-type": "application/json"}
            )
            self._note(kind, response.status_code, 400)

    async def _expect(self, client, kind: str, url: str, body: dict, status: int) -> None:
        response = await client.post(url, json=body)
        self._note(kind, response.status_code, status)
        if status == 200 and response.status_code == 200:
            json.loads(response.text)  # a whole JSON body

    async def _stream(
        self, client, kind: str, url: str, body: dict, hang_up_after: int | None
    ) -> None:
        """Read a stream to its end, or hang up after `hang_up_after` chunks."""
        async with client.stream("POST", url, json=body) as response:
            self._note(kind, response.status_code, 200)
            chunks = 0
            async for line in response.aiter_lines():
                if hang_up_after is not None and chunks >= hang_up_after:
                    return  # leaving the block closes the connection mid-stream
                if line.startswith("data: {"):
                    if '"error"' in line[:20]:
                        self.unexpected.append(f"stream error event: {line[:200]}")
                    chunks += 1

    def _note(self, what: str, status: int, expected: int) -> None:
        self.outcomes[f"{what} {status}"] += 1
        if status != expected:
            self.unexpected.append(f"{what}: {status}, expected {expected}")

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        per_phase = seconds / len(PHASES)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=REQUEST_DEADLINE + 5, limits=limits) as client:
            for index, clients in enumerate(PHASES):
                phase_end = min(deadline, time.monotonic() + per_phase)

                async def worker(phase_end=phase_end) -> None:
                    while time.monotonic() < phase_end and self.sent < MAX_REQUESTS:
                        await self.one(client)

                print(f"phase {index + 1}: {clients} concurrent clients", flush=True)
                await asyncio.gather(*(worker() for _ in range(clients)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / "kubellm-soak-server.log"
    server = start(
        [
            sys.executable,
            "-P",
            "-m",
            "kubellm.runtime.serve",
            "--model",
            args.model,
            "--served-model-name",
            "soak",
            "--port",
            str(port),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--kv-cache-memory-gib",
            "0.05",
            "--log-level",
            "warning",
        ],
        port,
        log,
    )
    try:
        soak = Soak(url, "soak", args.seed)
        asyncio.run(soak.run(5))  # warm-up, not counted
        soak = Soak(url, "soak", args.seed)
        rss_before = rss_mib(server.pid)
        started = time.monotonic()
        asyncio.run(soak.run(args.seconds))
        elapsed = time.monotonic() - started
        for _ in range(100):  # closing aborted streams is applied between steps
            state = metrics(url)
            idle = state.get("kubellm:num_requests_running") == 0
            if idle and state.get("kubellm:kv_cache_usage_perc") == 0:
                break
            time.sleep(0.1)
        rss_after = rss_mib(server.pid)
        health = httpx.get(url + "/health").status_code
    finally:
        server.terminate()
        code = server.wait(60)
    print(f"\n{soak.sent} requests in {elapsed:.0f} s; server exit code {code}\n")
    print("| outcome | count |\n|---|---|")
    for outcome, count in sorted(soak.outcomes.items()):
        print(f"| {outcome} | {count} |")
    print(
        f"\n| check | value |\n|---|---|\n| unexpected statuses or error events | "
        f"{len(soak.unexpected)} |\n| hung requests | {soak.hung} |\n"
        f"| running after | {state.get('kubellm:num_requests_running')} |\n"
        f"| waiting after | {state.get('kubellm:num_requests_waiting')} |\n"
        f"| KV cache in use after | {100 * state.get('kubellm:kv_cache_usage_perc', -1):.1f}% |\n"
        f"| preemptions | {state.get('kubellm:num_preemptions_total', 0):.0f} |\n"
        f"| /health after | {health} |\n"
        f"| server RSS | {rss_before:.0f} -> {rss_after:.0f} MiB "
        f"({rss_after - rss_before:+.0f}) |"
    )
    for line in soak.unexpected[:20]:
        print("unexpected:", line)
    clean = not soak.unexpected and not soak.hung and code == 0 and health == 200
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())

"""`kubellm serve --tensor-parallel-size N` as a real process group: it serves through the
`openai` SDK, SIGTERM stops every rank, and a worker killed mid-generation fails loudly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from kubellm.runtime import SamplingParams

from .serve_process import ServeProcess, is_running, start_long_requests

FAILURE_BOUND_SECONDS = 30  # kill -> errors out, /health 503, exit non-zero; measured ~3 s


def _worker_pids(server: ServeProcess) -> list[int]:
    match = re.search(r"group of \d+ ranks: worker pids ([\d ]+)", server.output)
    assert match, server.output
    return [int(pid) for pid in match.group(1).split()]


@pytest.mark.slow
def test_smollm2_over_three_ranks_serves_the_single_rank_text(smollm2):
    prompts = [f"Write the number {i} in words:" for i in range(32)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    expected = [o.outputs[0].text for o in smollm2.generate(prompts, greedy)]
    with ServeProcess(
        "--tensor-parallel-size",
        "3",
        "--served-model-name",
        "smol",
        "--kv-cache-memory-gib",
        "0.2",
        "--log-level",
        "info",
    ) as server:
        server.wait_healthy()
        workers = _worker_pids(server)
        assert len(workers) == 2 and all(is_running(pid) for pid in workers)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="smol",
            temperature=0,
            max_tokens=20,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in reply.choices[0].message.content
        whole = client.completions.create(
            model="smol", prompt=prompts[0], temperature=0, max_tokens=8
        )
        assert whole.choices[0].text == expected[0]

        async def streams() -> list[str]:
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")

            async def one(prompt: str) -> str:
                stream = await aclient.completions.create(
                    model="smol", prompt=prompt, temperature=0, max_tokens=8, stream=True
                )
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

            return await asyncio.gather(*(one(p) for p in prompts))

        assert asyncio.run(streams()) == expected  # 32 concurrent streams
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in workers), "a worker outlived the server"


def test_a_killed_worker_fails_in_flight_requests_and_the_server_exits_non_zero(
    tiny_model_dir,
):
    with ServeProcess(
        "--model",
        str(tiny_model_dir("gqa3-llama3-rope")),
        "--served-model-name",
        "tiny",
        "--tensor-parallel-size",
        "2",
        "--max-model-len",
        "512",
        "--log-level",
        "info",
    ) as server:
        server.wait_healthy()
        (worker,) = _worker_pids(server)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        results: dict = {}
        streaming = threading.Event()
        readers = start_long_requests(client, results, streaming)
        assert streaming.wait(60)
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        for reader in readers:
            reader.join(FAILURE_BOUND_SECONDS)
        assert not any(reader.is_alive() for reader in readers), "a request hangs"
        assert isinstance(results.get("plain"), openai.InternalServerError), results
        assert "the engine failed" in str(results["plain"])
        assert "the engine failed" in str(results.get("stream")), results
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        refused = client.with_options(max_retries=0).completions
        with pytest.raises(openai.InternalServerError) as new_request:
            refused.create(model="tiny", prompt="x", max_tokens=1)
        assert new_request.value.status_code == 503
        code = server.proc.wait(FAILURE_BOUND_SECONDS)
        assert code != 0 and time.monotonic() - killed < FAILURE_BOUND_SECONDS
    assert "the engine is dead" in server.output  # logged, with the reason

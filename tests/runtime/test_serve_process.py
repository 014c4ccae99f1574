"""`kubellm serve` as a real process: it serves, and SIGTERM drains it to exit code 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import free_port

from .serve_process import ServeProcess, start_long_requests


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(tiny_model_dir):
    with ServeProcess(
        "--model",
        str(tiny_model_dir("mha-tied")),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "512",
        "--shutdown-timeout",
        "60",
        "--log-level",
        "warning",
    ) as server:
        server.wait_healthy()
        url, proc = server.url, server.proc
        chunks: list[dict] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {
                "model": "tiny",
                "prompt": [1, 2],
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first_chunk.set()
                        time.sleep(0.01)  # a slow reader keeps the request in flight

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)  # the signal handler runs on the server's main thread
        assert httpx.get(url + "/health").status_code == 503
        refused = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert refused.status_code == 503
        reader.join(60)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks if c["choices"]) == 400
        assert proc.wait(60) == 0


def test_a_model_that_cannot_be_loaded_exits_1_saying_why(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    done = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "kubellm.runtime.serve",
            "--model",
            str(missing),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert f"could not load {missing}" in done.stderr and "does not exist" in done.stderr


def test_a_tensor_parallel_size_that_does_not_divide_the_model_exits_1_naming_it():
    done = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "kubellm.runtime.serve",
            "--tensor-parallel-size",
            "2",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "tensor_parallel_size 2 does not divide this model's 9 attention heads" in done.stderr
    assert "choose one of 1, 3" in done.stderr


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        (["--tensor-parallel-size", "0"], "tensor_parallel_size must be at least 1"),
        (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1]"),
        (["--max-num-seqs", "0"], "max_num_seqs must be at least 1"),
        (["--headless"], "--headless is for the nodes other than node 0"),
        (
            ["--nnodes", "2", "--node-rank", "1", "--pipeline-parallel-size", "2"],
            "node_rank 1 serves no API (node 0 does)",
        ),
        (
            ["--nnodes", "2", "--node-rank", "2", "--headless"],
            "node_rank 2 is not one of nnodes 2's node ranks 0..1",
        ),
        (
            ["--nnodes", "2", "--tensor-parallel-size", "3"],
            "tensor_parallel_size 3 x pipeline_parallel_size 1 = 3 ranks do not divide "
            "evenly over nnodes 2",
        ),
    ],
)
def test_unsupported_settings_fail_at_start_with_a_clear_message(flag, needle):
    done = subprocess.run(
        [sys.executable, "-P", "-m", "kubellm.runtime.serve", *flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and needle in done.stderr


def test_a_step_that_raises_fails_every_request_then_the_server_exits_1(tiny_model_dir):
    with ServeProcess(
        "--model",
        str(tiny_model_dir("mha-tied")),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "512",
        script=Path(__file__).with_name("faulty_serve.py"),
        env={"KUBELLM_TEST_FAIL_FORWARD_AT": "30"},
    ) as server:
        server.wait_healthy()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        results: dict = {}
        streaming = threading.Event()
        readers = start_long_requests(client, results, streaming)
        for reader in readers:
            reader.join(30)
        assert not any(reader.is_alive() for reader in readers), "a request hangs"
        assert streaming.is_set()  # the stream had started when the step failed
        plain = results["plain"]
        assert isinstance(plain, openai.InternalServerError) and plain.status_code == 500
        assert plain.body["type"] == "InternalServerError"
        assert "injected fault in forward pass 30" in plain.body["message"]
        assert "the engine failed" in str(results["stream"])
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "injected fault" in health.json()["reason"]
        assert httpx.get(server.url + "/live").status_code == 503
        refused = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert refused.status_code == 503 and "the engine failed" in refused.text
        assert server.proc.wait(30) == 1
    assert "Traceback" in server.output  # the failure is logged with its trace


def test_log_level_warning_prints_no_info_and_json_lines_carry_the_request_id(tiny_model_dir):
    model = str(tiny_model_dir("mha-tied"))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    with ServeProcess(
        "--model", model, "--served-model-name", "tiny", "--log-level", "warning"
    ) as quiet:
        quiet.wait_healthy()
        assert httpx.post(quiet.url + "/v1/completions", json=body).status_code == 200
        quiet.proc.send_signal(signal.SIGTERM)
        assert quiet.proc.wait(60) == 0
    assert " INFO " not in quiet.output, quiet.output
    with ServeProcess(
        "--model", model, "--served-model-name", "tiny", "--log-format", "json"
    ) as loud:
        loud.wait_healthy()
        replies = [httpx.post(loud.url + "/v1/completions", json=body) for _ in range(3)]
        loud.proc.send_signal(signal.SIGTERM)
        assert loud.proc.wait(60) == 0
    records = [json.loads(line) for line in loud.lines if line.strip()]  # every line is JSON
    access = [r for r in records if r["logger"] == "kubellm.access"]
    assert sorted(r["request_id"] for r in access) == sorted(r.json()["id"] for r in replies)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's too, once
    assert len({(r["logger"], r["message"]) for r in records}) == len(records)


# Command lines from the vLLM deployment guides our users copy (with --model and --port
# ours): each runs unchanged or is refused at start saying what kubellm does instead.
VLLM_COMMAND_LINES = {
    "tp1-guide": (
        [
            "--host",
            "0.0.0.0",
            "--tensor-parallel-size",
            "1",
            "--gpu-memory-utilization",
            "0.90",
            "--max-model-len",
            "4096",
        ],
        None,
    ),
    "swap-space": (
        [
            "--gpu-memory-utilization",
            "0.90",
            "--max-num-batched-tokens",
            "32768",
            "--max-num-seqs",
            "256",
            "--block-size",
            "16",
            "--swap-space",
            "4",
            "--enforce-eager",
        ],
        "swap_space 4 is not supported: kubellm preempts by recomputation",
    ),
    "pipeline": (["--pipeline-parallel-size", "2", "--max-model-len", "512"], None),
}


@pytest.mark.parametrize("name", sorted(VLLM_COMMAND_LINES))
def test_vllm_command_lines_run_or_are_refused_saying_why(name):
    flags, refusal = VLLM_COMMAND_LINES[name]
    with ServeProcess("--model", "smollm2-135m-instruct", *flags) as server:
        if refusal is None:
            server.wait_healthy()
            reply = httpx.post(
                server.url + "/v1/completions",
                timeout=60,
                json={"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 3},
            )
            assert reply.status_code == 200, reply.text
        else:
            assert server.proc.wait(60) == 2
            assert refusal in server.output, server.output

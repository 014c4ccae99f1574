"""`kubellm serve` as a real process: it serves, and SIGTERM drains it to exit code 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.helpers import free_port

from .serve_process import ServeProcess


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(tiny_model_dir):
    with ServeProcess("--model", str(tiny_model_dir("mha-tied")), "--served-model-name", "tiny",
                      "--max-model-len", "512", "--shutdown-timeout", "60",
                      "--log-level", "warning") as server:  # fmt: skip
        server.wait_healthy()
        url, proc = server.url, server.proc
        chunks: list[dict] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 400, "ignore_eos": True,
                    "stream": True}  # fmt: skip
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
        [sys.executable, "-m", "kubellm.runtime.serve", "--model", str(missing),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"could not load {missing}" in done.stderr and "does not exist" in done.stderr


def test_a_tensor_parallel_size_that_does_not_divide_the_model_exits_1_naming_it():
    done = subprocess.run(
        [sys.executable, "-m", "kubellm.runtime.serve", "--tensor-parallel-size", "2",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "tensor_parallel_size 2 does not divide this model's 9 attention heads" in done.stderr
    assert "choose one of 1, 3" in done.stderr


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        (["--tensor-parallel-size", "0"], "tensor_parallel_size must be at least 1"),
        (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1]"),
        (["--max-num-seqs", "0"], "max_num_seqs must be at least 1"),
    ],
)
def test_unsupported_settings_fail_at_start_with_a_clear_message(flag, needle):
    done = subprocess.run(
        [sys.executable, "-m", "kubellm.runtime.serve", *flag],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and needle in done.stderr

"""`kubellm serve` as a real process: it serves, and SIGTERM drains it to exit code 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_the_in_flight_request_finish_then_exits_0(tiny_model_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubellm.runtime.serve", "--model", str(tiny_model_dir("mha-tied")),
         "--served-model-name", "tiny", "--port", str(port), "--max-model-len", "512",
         "--shutdown-timeout", "60", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
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
    finally:
        proc.kill()

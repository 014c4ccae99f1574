"""`kubellm serve` as a real process, its output collected as it runs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

from tests.helpers import free_port


class ServeProcess:
    """Start `python -m kubellm.runtime.serve ARGS --port <free>` (or a script, or another
    `kubellm` command, with the same command line); killed on exit. `prefix`: a command
    that runs it (`ip netns exec NAME`), `host`: where its URL points."""

    def __init__(
        self,
        *args: str,
        script: Path | None = None,
        command: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        host: str = "127.0.0.1",
    ) -> None:
        port = port or free_port()
        program = ["-m", "kubellm.runtime.serve"]
        if script or command:
            program = [str(script)] if script else ["-m", "kubellm", command]
        self.url = f"http://{host}:{port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-P", *program, *args, "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}:\n{self.output}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server never became healthy:\n{self.output}")

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.proc.kill()
        self.proc.wait(10)


def is_running(pid: int) -> bool:
    """True unless the process is gone or a zombie (which nothing is left of but its pid)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def start_long_requests(
    client, results: dict, streaming: threading.Event
) -> list[threading.Thread]:
    """A plain and a streaming completion (openai SDK), long enough to be running when a
    fault comes: `results["plain"]` gets the response or the APIError, `results["stream"]`
    the stream's APIError; `streaming` is set at the first chunk."""
    long = dict(model="tiny", prompt=[5, 6, 7], max_tokens=400, extra_body={"ignore_eos": True})

    def plain() -> None:
        try:
            results["plain"] = client.completions.create(**long)
        except openai.APIError as exc:
            results["plain"] = exc

    def streamed() -> None:
        try:
            for _ in client.completions.create(**long, stream=True):
                streaming.set()
                time.sleep(0.005)  # a slow reader keeps the request in flight
        except openai.APIError as exc:
            results["stream"] = exc

    readers = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for reader in readers:
        reader.start()
    return readers

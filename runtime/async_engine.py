"""AsyncEngine: the engine's step loop on a thread of its own, streams on the event loop.

Each request gets an asyncio queue of `StepDelta`s. The step thread only ever
touches the engine under one lock, as do `add_request` and `abort`, so the HTTP
handlers never block the event loop on model work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from kubellm.runtime.engine import LLMEngine
from kubellm.runtime.outputs import StepDelta
from kubellm.runtime.sampling_params import SamplingParams


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepDelta]


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kubellm-engine", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[StepDelta]:
        """Deltas of every sequence of the request until all have finished.

        Bad input raises ValueError before anything is queued. Leaving early (a client
        that hung up) aborts the request and frees its blocks.
        """
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._work:
            self.engine.add_request(request_id, prompt, params)
            self._streams[request_id] = stream
            self._work.notify()
        remaining = params.n
        try:
            while remaining:
                delta = await stream.queue.get()
                remaining -= delta.finish_reason is not None
                yield delta
        finally:
            with self._lock:
                if remaining:
                    self.engine.abort_request(request_id)
                self.engine.take_output(request_id)
                del self._streams[request_id]

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def shutdown(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._work:
                while not self._stopping and not self.engine.has_unfinished_requests():
                    self._work.wait()
                if self._stopping:
                    return
                deltas = self.engine.step()
                for delta in deltas:
                    stream = self._streams.get(delta.request_id)
                    if stream is not None:
                        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

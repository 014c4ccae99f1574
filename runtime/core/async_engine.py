"""AsyncEngine: the engine's step loop on a thread of its own, streams on the event loop.

Only the step thread touches the engine. HTTP handlers admit a request (`Admission`, on a
worker thread), then hand it over as a command the step thread applies between two steps; closing
a stream is a command too. (A lock shared with a busy step loop is not fair: a handler
waiting on it could wait for many steps.) Each API request gets a `RequestStream`, one
asyncio queue fed with the `StepDelta`s of all its prompts and sequences.

A failure the engine cannot recover from (a step that raises, a worker
that died) kills it loudly: every open stream raises `EngineDeadError`, new requests are
refused with it, and the listeners (`kubellm serve`: health 503, then a non-zero exit)
are told. The engine's state after such a failure is unknown (a step may have half
updated the scheduler, the ranks may disagree), so nothing is retried.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from kubellm.runtime.core.admission import Admitted
from kubellm.runtime.core.engine import LLMEngine
from kubellm.runtime.core.outputs import EngineStats, StepDelta

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A request could not be completed (a server-side failure, not the client's input)."""


class RequestFailedError(GenerationError):
    """This request alone failed (e.g. its text could not be decoded); the engine serves on."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"this request failed: {reason}")


class EngineDeadError(GenerationError):
    """The engine failed and serves nothing more."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the engine failed: {reason}")


# A step running longer than this is taken as hung (a device or a collective that never
# returns): /live and /health say so, and the pod's liveness probe restarts it.
STEP_STALL_SECONDS = 120.0


class RequestStream:
    """The deltas of one API request (k prompts x n sequences) as (choice index, delta),
    where choice index = prompt index * n + sequence index, as OpenAI numbers choices.

    Iterate until every sequence has finished; `close()` (always, e.g. in a `finally`)
    aborts whatever is unfinished, such as the request of a client that hung up.
    """

    def __init__(self, owner: AsyncEngine, engine_ids: list[str], n: int) -> None:
        self._owner = owner
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[StepDelta | EngineDeadError] = asyncio.Queue()
        self.engine_ids = engine_ids
        self._prompt_index = {request_id: k for k, request_id in enumerate(engine_ids)}
        self.n = n
        self.remaining = len(engine_ids) * n
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, StepDelta]:
        if not self.remaining:
            raise StopAsyncIteration
        delta = await self.queue.get()
        if isinstance(delta, EngineDeadError):
            raise delta
        if delta.error is not None:
            raise RequestFailedError(delta.error)
        self.remaining -= delta.finish_reason is not None
        return self._prompt_index[delta.request_id] * self.n + delta.index, delta

    def close(self) -> None:
        self._owner._close(self)


class AsyncEngine:
    """The HTTP layer's only door to the engine: the tokenizer and context length (fixed
    at load), admission, submitting and closing requests, and a stats snapshot that the
    step thread takes (nothing reads the engine's live state from the event loop)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.admission = engine.admission  # pure and thread-safe: run it off the event loop
        self.max_model_len = engine.max_model_len
        self.stats: EngineStats = engine.stats()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # engine request id -> its stream
        self._stopping = False
        self.failure: str | None = None  # why the engine died, once it has
        self._failure_lock = threading.Lock()
        self._failure_listeners: list[Callable[[str], None]] = []
        self._step_started: float | None = None  # monotonic time, while a step runs
        self._thread = threading.Thread(target=self._run, name="kubellm-engine", daemon=True)
        self._thread.start()
        engine.on_worker_lost(self._fail)

    def stalled_seconds(self) -> float | None:
        """How long the running step has taken, if longer than STEP_STALL_SECONDS."""
        started = self._step_started
        running = 0.0 if started is None else time.monotonic() - started
        return running if running >= STEP_STALL_SECONDS else None

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` (from the thread that saw it) when the engine dies."""
        self._failure_listeners.append(listener)
        if self.failure is not None:
            listener(self.failure)

    @property
    def num_in_flight(self) -> int:
        """Engine requests (prompts) submitted and not yet closed."""
        return len(self._streams)

    def submit(self, request_id: str, admitted: Sequence[Admitted]) -> RequestStream:
        """Queue every admitted prompt (as `request_id-k`); a dead engine raises
        EngineDeadError and queues nothing. Call from the event loop."""
        if self.failure is not None:
            raise EngineDeadError(self.failure)
        engine_ids = [f"{request_id}-{k}" for k in range(len(admitted))]
        stream = RequestStream(self, engine_ids, admitted[0].params.n)
        for engine_id in engine_ids:
            self._streams[engine_id] = stream
        if self.failure is not None:  # died while this was registered: nobody would answer
            for engine_id in engine_ids:
                self._streams.pop(engine_id, None)
            raise EngineDeadError(self.failure)

        def add() -> None:
            for engine_id, prompt in zip(engine_ids, admitted):
                self.engine.add_request(engine_id, prompt)

        self._command(add)
        return stream

    def shutdown(self) -> None:
        """Stop the step thread, then the workers (other ranks)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _close(self, stream: RequestStream) -> None:
        """Forget the stream now; the step thread aborts what is unfinished."""
        if stream.closed:
            return
        stream.closed = True
        for engine_id in stream.engine_ids:
            self._streams.pop(engine_id, None)

        def release() -> None:
            for engine_id in stream.engine_ids:
                self.engine.abort_request(engine_id)
                self.engine.take_output(engine_id)

        self._command(release)

    def _command(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _apply_commands(self) -> None:
        """Apply what the handlers handed over. One that raises is a bug (bad input was
        refused in `submit`) and leaves the engine in an unknown state: fatal."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:
            logger.exception("the engine loop raised")
            self._fail(f"{type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        while not self._stopping and self.failure is None:
            self._wake.wait()
            self._wake.clear()
            self._apply_commands()
            self.stats = self.engine.stats()
            while self.engine.has_unfinished_requests() and not self._stopping:
                if self.failure is not None:
                    return
                self._step_started = time.monotonic()
                deltas = self.engine.step()
                self._step_started = None
                self._dispatch(deltas)
                self._apply_commands()
                self.stats = self.engine.stats()

    def _fail(self, reason: str) -> None:
        """The engine is dead: fail every open stream, tell the listeners (once)."""
        with self._failure_lock:
            if self.failure is not None:
                return
            self.failure = reason
        logger.error("the engine is dead: %s", reason)
        streams = {id(s): s for s in list(self._streams.values())}.values()
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDeadError(reason))
        self._wake.set()
        for listener in self._failure_listeners:
            listener(reason)

    def _dispatch(self, deltas: list[StepDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

"""Workers: ranks 1..N-1 (tensor-parallel shards and pipeline stages) as processes of their
own, driven by rank 0.

The engine (rank 0) spawns them; each joins the group, builds its own `ModelRunner` (the
same code as rank 0's, on its shard) and then runs whatever rank 0 sends: a method name
and its arguments, in practice `execute(plan)` once per step. Commands travel over one
pipe per worker: a worker waits on it for as long as the server is idle (no collective
timeout), and it reads EOF when rank 0 is gone, so no worker outlives its engine. The
collectives inside the model keep the ranks in lockstep.

A worker that dies is a dead engine: rank 0's next collective fails (gloo notices a
closed peer at once), and a watchdog thread that waits on the workers' process
sentinels reports the loss even while rank 0 waits elsewhere (NCCL would hang).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait

import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.executor.distributed import Parallel, join_group, leave_group, open_store
from kubellm.runtime.executor.platform import Platform
from kubellm.runtime.logs import JSONFormatter, configure_logging

logger = logging.getLogger(__name__)

STOP = "stop"


def ready_key(process_name: str) -> str:
    return f"started/{process_name}"


class WorkerGroup:
    """Rank 0's handle on the other ranks; constructing it joins rank 0 to the group."""

    def __init__(self, config: EngineConfig, platform: Platform, num_layers: int) -> None:
        size = config.world_size
        layout = (config.tensor_parallel_size, config.pipeline_parallel_size, num_layers)
        store = open_store(size)
        context = mp.get_context("spawn")
        self.processes: list[mp.process.BaseProcess] = []
        self._pipes: list[Connection] = []
        self._stopping = False
        for rank in range(1, size):
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=worker_main,
                name=f"kubellm-rank{rank}",
                daemon=True,
                args=(config, platform, layout, rank, store.port, receive, _log_settings()),
            )
            process.start()
            receive.close()
            self.processes.append(process)
            self._pipes.append(send)
        self._finalizer = weakref.finalize(self, _stop, self.processes, self._pipes)
        try:
            self._wait_for_workers(store)
            self.parallel: Parallel = join_group(
                0, size, store.port, platform.device_of(0, size), layout, store
            )
        except BaseException:
            self.kill()
            raise
        self._store = store  # kept alive: the workers rendezvous through it
        logger.info(
            "a group of %d ranks: worker pids %s",
            size,
            " ".join(str(pid) for pid in self.pids),
        )

    def _wait_for_workers(self, store) -> None:
        """Every worker has started and is about to join the group; a worker that died on
        the way (a bad import, no memory) fails the start instead of leaving rank 0
        waiting for it until the collective timeout."""
        keys = [ready_key(p.name) for p in self.processes]
        while not store.check(keys):
            dead = [p for p in self.processes if not p.is_alive()]
            if dead:
                raise RuntimeError(
                    f"worker {dead[0].name} exited with code "
                    f"{dead[0].exitcode} before joining the group (see its log above)"
                )
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def send(self, method: str, *args) -> None:
        """Have every worker run `runner.<method>(*args)` (rank 0 runs it itself)."""
        message = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for pipe in self._pipes:
            pipe.send_bytes(message)

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call `on_lost(reason)` from a thread of its own if a worker ends unasked."""

        def watchdog() -> None:
            wait([p.sentinel for p in self.processes])
            if self._stopping:
                return
            gone = next(p for p in self.processes if not p.is_alive())
            on_lost(f"worker {gone.name} (pid {gone.pid}) exited with code {gone.exitcode}")

        threading.Thread(target=watchdog, name="kubellm-tp-watchdog", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (killed if they do not stop within `timeout`), leave the group."""
        self._stopping = True
        self._finalizer.detach()
        _stop(self.processes, self._pipes, timeout)
        leave_group()

    def kill(self) -> None:
        """For a start that failed half-way: no worker may wait for a peer that is gone."""
        self._stopping = True
        self._finalizer.detach()
        for process in self.processes:
            process.kill()
            process.join(timeout=5)
        leave_group()


def _stop(processes, pipes: list[Connection], timeout: float = 10.0) -> None:
    message = pickle.dumps((STOP, ()))
    for pipe in pipes:
        try:
            pipe.send_bytes(message)
            pipe.close()
        except OSError:  # that worker is already gone
            pass
    for process in processes:
        process.join(timeout=timeout)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _log_settings() -> tuple[str, str]:
    """The level and format rank 0 logs with, for the workers to log alike."""
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    log_format = "json" if isinstance(formatter, JSONFormatter) else "text"
    return logging.getLevelName(root.getEffectiveLevel()).lower(), log_format


def worker_main(
    config: EngineConfig,
    platform: Platform,
    layout: tuple[int, int, int],
    rank: int,
    port: int,
    commands: Connection,
    log_settings: tuple[str, str],
) -> None:
    """A worker process: join the group, build this rank's runner, run rank 0's commands."""
    configure_logging(*log_settings)
    from kubellm.runtime.executor.model_runner import ModelRunner
    from kubellm.runtime.model.source import resolve

    size = config.world_size
    if platform.device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    parallel = join_group(
        rank,
        size,
        port,
        platform.device_of(rank, size),
        layout,
        ready_key=ready_key(mp.current_process().name),
    )
    source = resolve(config.model, config.revision, config.download_dir, config.quantization)
    max_model_len = config.resolve_max_model_len(source.config)
    runner = ModelRunner(config, source, max_model_len, platform, parallel)
    while True:
        try:
            method, args = pickle.loads(commands.recv_bytes())
        except EOFError:  # rank 0 is gone
            break
        if method == STOP:
            break
        getattr(runner, method)(*args)
    leave_group()

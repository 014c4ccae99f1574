"""Workers: ranks 1..N-1 (tensor-parallel shards and pipeline stages) as processes of their
own, driven by rank 0.

The engine (rank 0) spawns its node's; each joins the group, builds its own `ModelRunner`
(the same code as rank 0's, on its shard) and then runs whatever rank 0 sends: a method name
and its arguments, in practice `execute(plan)` once per step. Commands travel over one
pipe per worker: a worker waits on it for as long as the server is idle (no collective
timeout), and it reads EOF when rank 0 is gone, so no worker outlives its engine. The
collectives inside the model keep the ranks in lockstep. With several nodes the other
nodes' ranks get the same commands through their node's supervisor (`headless.py`).

A worker that dies is a dead engine: rank 0's next collective fails (gloo notices a
closed peer at once), and a watchdog thread that waits on the workers' process
sentinels and the other nodes' connections reports the loss even while rank 0 waits
elsewhere (NCCL would hang). A worker whose parent dies exits at once, even mid-step.
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
from kubellm.runtime.executor.distributed import (
    Parallel,
    connect_store,
    join_group,
    leave_group,
    open_store,
)
from kubellm.runtime.executor.nodes import (
    STOP,
    STOP_MESSAGE,
    Meeting,
    interface_towards,
    nodes_named,
)
from kubellm.runtime.executor.platform import Platform
from kubellm.runtime.logs import JSONFormatter, configure_logging

logger = logging.getLogger(__name__)


def ready_key(rank: int) -> str:
    return f"kubellm/started/{rank}"


class WorkerGroup:
    """Rank 0's handle on the other ranks; constructing it joins rank 0 to the group."""

    def __init__(self, config: EngineConfig, platform: Platform, num_layers: int) -> None:
        self.config = config
        layout = (config.tensor_parallel_size, config.pipeline_parallel_size, num_layers)
        several = config.nnodes > 1
        store = open_store(config.world_size, config.master_port if several else 0)
        if several:
            _listen_towards(config)
        self.processes, self._pipes = spawn_ranks(
            config, platform, layout, config.ranks_of_node(0)[1:], ("127.0.0.1", store.port)
        )
        self._links: dict[int, Connection] = {}  # the other nodes' supervisors, by node
        self._stopping = False
        self._finalizer = weakref.finalize(self, _stop, self.processes, self._pipes, self._links)
        try:
            meeting = Meeting(config, store, str(platform.dtype), self._links) if several else None
            self._wait_for_ranks(store, meeting)
            self.parallel: Parallel = join_group(
                0, config.world_size, store, platform.device_of(0), layout
            )
        except BaseException:
            self.kill()
            raise
        self._store = store  # kept alive: the workers rendezvous through it
        pids = " ".join(str(pid) for pid in self.pids) or "none"
        if several:
            logger.info(
                "a group of %d ranks over %d nodes; the others: %s; this node's worker pids %s",
                config.world_size,
                config.nnodes,
                nodes_named(sorted(self._links), config),
                pids,
            )
        else:
            logger.info("a group of %d ranks: worker pids %s", config.world_size, pids)

    def _wait_for_ranks(self, store, meeting: Meeting | None) -> None:
        """Every rank has started and is about to join the group, and every other node is
        connected; a worker that died on the way (a bad import, no memory) or a node that
        refused fails the start at once instead of leaving rank 0 waiting for it until the
        collective timeout, and so does a rank missing after distributed_timeout."""
        keys = [ready_key(r) for r in range(1, self.config.world_size)]
        deadline = time.monotonic() + self.config.distributed_timeout
        try:
            while not store.check(keys) or (meeting and meeting.missing):
                dead = [p for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"worker {dead[0].name} exited with code "
                        f"{dead[0].exitcode} before joining the group (see its log above)"
                    )
                if meeting:
                    meeting.poll()
                else:
                    time.sleep(0.05)
                if time.monotonic() > deadline:
                    raise RuntimeError(self._late(store, keys, meeting))
        finally:
            if meeting:
                meeting.close()

    def _late(self, store, keys: list[str], meeting: Meeting | None) -> str:
        config = self.config
        waiting = config.distributed_timeout
        if not meeting:
            return f"the workers did not start within {waiting:g} s (distributed_timeout)"
        late = sorted(
            set(meeting.missing)
            | {config.node_of(r + 1) for r, key in enumerate(keys) if not store.check([key])}
        )
        return (
            f"{nodes_named(late, config)} did not join within {waiting:g} s "
            f"(distributed_timeout): start `kubellm serve --headless --nnodes {config.nnodes} "
            f"--node-rank N --master-addr {config.master_addr} --master-port "
            f"{config.master_port}` with this node's flags on each, reaching "
            f"{config.master_addr}:{config.master_port}"
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def send(self, method: str, *args) -> None:
        """Have every worker run `runner.<method>(*args)` (rank 0 runs it itself)."""
        message = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for channel in [*self._pipes, *self._links.values()]:
            channel.send_bytes(message)

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call `on_lost(reason)` from a thread of its own if a worker ends unasked, or
        another node's connection closes."""
        nodes = {link: node for node, link in self._links.items()}

        def watchdog() -> None:
            ready = wait([*(p.sentinel for p in self.processes), *nodes])
            if self._stopping:
                return
            lost = [nodes[r] for r in ready if r in nodes]
            if lost:
                on_lost(f"{nodes_named(lost, self.config)} is gone: its connection closed")
                return
            gone = next(p for p in self.processes if not p.is_alive())
            on_lost(f"worker {gone.name} (pid {gone.pid}) exited with code {gone.exitcode}")

        threading.Thread(target=watchdog, name="kubellm-tp-watchdog", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (killed if they do not stop within `timeout`), leave the group."""
        self._stopping = True
        self._finalizer.detach()
        _stop(self.processes, self._pipes, self._links, timeout)
        leave_group()

    def kill(self) -> None:
        """For a start that failed half-way: no worker may wait for a peer that is gone."""
        self._stopping = True
        self._finalizer.detach()
        for link in self._links.values():
            link.close()  # that node's supervisor stops its ranks
        kill_ranks(self.processes)
        leave_group()


def spawn_ranks(
    config: EngineConfig,
    platform: Platform,
    layout: tuple[int, int, int],
    ranks: range,
    store_address: tuple[str, int],
) -> tuple[list[mp.process.BaseProcess], list[Connection]]:
    """Start a worker process per rank, each with the sending end of its command pipe."""
    context = mp.get_context("spawn")
    processes, pipes = [], []
    for rank in ranks:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=worker_main,
            name=f"kubellm-rank{rank}",
            daemon=True,
            args=(config, platform, layout, rank, store_address, receive, _log_settings()),
        )
        process.start()
        receive.close()
        processes.append(process)
        pipes.append(send)
    return processes, pipes


def _stop(
    processes, pipes: list[Connection], links: dict[int, Connection], timeout: float = 10.0
) -> None:
    stop_ranks(processes, [*pipes, *links.values()], timeout)


def stop_ranks(processes, channels: list[Connection], timeout: float = 10.0) -> None:
    """Send stop down each channel (a worker's pipe, another node's link), then wait for
    the processes; those still running after `timeout` are killed."""
    for channel in channels:
        try:
            channel.send_bytes(STOP_MESSAGE)
            channel.close()
        except OSError:  # that worker or node is already gone
            pass
    for process in processes:
        process.join(timeout=timeout)
    kill_ranks(processes)


def kill_ranks(processes) -> None:
    """Kill the worker processes still running, and reap them."""
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _listen_towards(config: EngineConfig) -> None:
    """Across nodes, gloo listens on the interface that reaches node 0 (unless told)."""
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = interface_towards(config.master_addr, config.distributed_timeout)
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def _exit_with_parent() -> None:
    """Exit as soon as the process that started this one is gone, even mid-collective."""

    def watch() -> None:
        wait([mp.parent_process().sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="kubellm-parent-watch", daemon=True).start()


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
    store_address: tuple[str, int],
    commands: Connection,
    log_settings: tuple[str, str],
) -> None:
    """A worker process: join the group, build this rank's runner, run rank 0's commands."""
    configure_logging(*log_settings)
    _exit_with_parent()
    from kubellm.runtime.executor.model_runner import ModelRunner
    from kubellm.runtime.model.source import resolve

    if platform.device.type == "cpu":  # the node's ranks share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.ranks_per_node))
    if config.nnodes > 1:
        _listen_towards(config)
    store = connect_store(*store_address, config.world_size, config.distributed_timeout)
    store.set(ready_key(rank), "1")
    device = platform.device_of(config.local_rank(rank))
    parallel = join_group(rank, config.world_size, store, device, layout)
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

"""`kubellm serve --headless`: a node other than node 0 (`nodes.py` tells how the nodes
meet). Its process serves no API: it meets node 0, starts this node's ranks and relays node
0's plans to them, and is gone, non-zero, as soon as node 0 or one of its ranks is."""

from __future__ import annotations

import logging
from dataclasses import replace
from multiprocessing.connection import Connection, wait

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.executor.nodes import STOP_MESSAGE, Leader
from kubellm.runtime.executor.platform import choose_platform
from kubellm.runtime.executor.workers import kill_ranks, spawn_ranks, stop_ranks
from kubellm.runtime.model.source import resolve

logger = logging.getLogger(__name__)


def run_headless(config: EngineConfig) -> int:
    """`kubellm serve --headless`: meet node 0, start this node's ranks, relay node 0's
    plans to them until node 0 says stop (0) or node 0 or a rank is lost (1)."""
    try:
        leader = Leader(config)
    except ValueError as exc:
        logger.error("kubellm serve --headless: %s", exc)
        return 2
    except (RuntimeError, OSError) as exc:
        logger.error("kubellm serve --headless: could not meet node 0: %s", exc)
        return 1
    config = replace(config, dtype=leader.dtype)  # node 0's choice, so the stages agree
    source = resolve(config.model, config.revision, config.download_dir, config.quantization)
    platform = choose_platform(config, source.stays_quantized)
    layout = (config.tensor_parallel_size, config.pipeline_parallel_size, source.config.num_layers)
    ranks = config.ranks_of_node(config.node_rank)
    processes, pipes = spawn_ranks(
        config, platform, layout, ranks, (config.master_addr, config.master_port)
    )
    logger.info(
        "node %d of %d: ranks %d..%d, pids %s; plans from node 0 at %s",
        config.node_rank,
        config.nnodes,
        ranks[0],
        ranks[-1],
        " ".join(str(p.pid) for p in processes),
        config.master_addr,
    )
    try:
        return relay(leader.link, processes, pipes)
    finally:
        kill_ranks(processes)


def relay(link: Connection, processes, pipes: list[Connection]) -> int:
    """Forward node 0's messages to this node's ranks: 0 after node 0's stop, 1 when node 0
    or one of the ranks is gone."""
    sentinels = {p.sentinel: p for p in processes}
    while True:
        ready = wait([link, *sentinels])
        gone = [sentinels[s] for s in ready if s in sentinels]
        if gone:
            logger.error(
                "kubellm serve --headless: rank process %s exited with code %s; stopping this node",
                gone[0].name,
                gone[0].exitcode,
            )
            link.close()
            return 1
        try:
            message = link.recv_bytes()
        except (EOFError, OSError) as exc:
            logger.error("kubellm serve --headless: node 0 is gone (%s); stopping this node", exc)
            return 1
        if message == STOP_MESSAGE:
            stop_ranks(processes, pipes)
            return 0
        for pipe in pipes:
            pipe.send_bytes(message)

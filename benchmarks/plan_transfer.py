"""What it costs to hand a step's plan to another rank: over a pipe (ranks on rank 0's node,
today's path), over TCP (a headless node's supervisor), and over TCP then the supervisor's
pipe to its rank (how a remote rank gets it). Each is a round trip: rank 0 sends the
pickled `("launch", (plan,))` a decode step sends, the far end unpickles it and answers
one byte back the same way.

    python benchmarks/plan_transfer.py [--repeats 2000]

The TCP here is loopback on one machine: the system calls and copies of a real network,
not its wire time. Prints a markdown table (microseconds, medians).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import socket
import statistics
import time
from multiprocessing.connection import Connection

import numpy as np
import torch
from timing import cpu_model

from kubellm.runtime.executor.step_plan import StepPlan

ROWS = (1, 16, 64, 256)
CONTEXT_BLOCKS = 32  # every sequence 512 tokens in, 16-token blocks


def decode_plan(rows: int) -> StepPlan:
    """`rows` sequences decoding one token each, `CONTEXT_BLOCKS` blocks in."""
    tables = np.arange(rows * CONTEXT_BLOCKS, dtype=np.int64).reshape(rows, CONTEXT_BLOCKS)
    return StepPlan(
        input_ids=np.arange(rows, dtype=np.int64),
        positions=np.full(rows, CONTEXT_BLOCKS * 16 - 1, dtype=np.int64),
        slot_mapping=tables[:, -1] * 16 + 15,
        query_start_loc=np.arange(rows + 1, dtype=np.int32),
        seq_lens=np.full(rows, CONTEXT_BLOCKS * 16, dtype=np.int32),
        block_tables=tables,
        contiguous_starts=tables[:, 0].tolist(),
        logits_indices=np.arange(rows, dtype=np.int64),
        prompt_indices=np.zeros(0, dtype=np.int64),
    )


def _echo(inbox: Connection, outbox: Connection) -> None:
    """The far rank: unpickle each plan, answer a byte; an empty message ends it."""
    while message := inbox.recv_bytes():
        pickle.loads(message)
        outbox.send_bytes(b"k")


def _echo_tcp(port: int) -> None:
    link = _connect(port)
    _echo(link, link)


def _relay_tcp(port: int) -> None:
    """A supervisor: forward each message to its rank's pipe and the answer back."""
    link = _connect(port)
    context = mp.get_context("spawn")
    to_rank, from_rank = context.Pipe(duplex=False), context.Pipe(duplex=False)
    rank = context.Process(target=_echo, args=(to_rank[0], from_rank[1]))
    rank.start()
    while True:
        message = link.recv_bytes()
        to_rank[1].send_bytes(message)
        if not message:
            break
        link.send_bytes(from_rank[0].recv_bytes())
    rank.join()


def _connect(port: int) -> Connection:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock.detach())


def round_trips(outbox: Connection, inbox: Connection, repeats: int) -> dict[int, float]:
    """Median microseconds per round trip, per rows."""
    costs = {}
    for rows in ROWS:
        message = pickle.dumps(("launch", (decode_plan(rows),)), pickle.HIGHEST_PROTOCOL)
        times = []
        for i in range(repeats + 20):
            started = time.perf_counter()
            outbox.send_bytes(message)
            inbox.recv_bytes()
            if i >= 20:
                times.append(time.perf_counter() - started)
        costs[rows] = statistics.median(times) * 1e6
    outbox.send_bytes(b"")
    return costs


def over_pipes(repeats: int) -> dict[int, float]:
    context = mp.get_context("spawn")
    to_rank, from_rank = context.Pipe(duplex=False), context.Pipe(duplex=False)
    rank = context.Process(target=_echo, args=(to_rank[0], from_rank[1]))
    rank.start()
    costs = round_trips(to_rank[1], from_rank[0], repeats)
    rank.join()
    return costs


def over_tcp(far_end, repeats: int) -> dict[int, float]:
    listener = socket.create_server(("127.0.0.1", 0))
    process = mp.get_context("spawn").Process(target=far_end, args=(listener.getsockname()[1],))
    process.start()
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link = Connection(sock.detach())
    costs = round_trips(link, link, repeats)
    process.join()
    listener.close()
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}\n")
    paths = {
        "pipe (a rank on node 0)": over_pipes(args.repeats),
        "TCP (a headless node's supervisor)": over_tcp(_echo_tcp, args.repeats),
        "TCP, then its pipe (a rank on a headless node)": over_tcp(_relay_tcp, args.repeats),
    }
    sizes = {r: len(pickle.dumps(("launch", (decode_plan(r),)), 5)) for r in ROWS}
    print("| plan of a decode step over | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("|---|" + "---|" * len(ROWS))
    print("| bytes | " + " | ".join(f"{sizes[r]:,}" for r in ROWS) + " |")
    for name, costs in paths.items():
        print(f"| {name}, us | " + " | ".join(f"{costs[r]:,.0f}" for r in ROWS) + " |")


if __name__ == "__main__":
    main()

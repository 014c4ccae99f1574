"""What pipeline parallelism costs and buys on this machine: a stage boundary (the hidden
states and residual of a step sent to the next stage's process and the logits back to
rank 0, gloo over loopback TCP), and offline decode throughput of the built-in model at
one stage against two, with one batch in flight (every stage waits for the others: the
bubble) and with one batch per stage.

    python benchmarks/pipeline.py [--requests 16] [--tokens 64]

Prints markdown tables (microseconds per boundary, medians; tokens per second).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timing import cpu_model

from kubellm.runtime import LLM, SamplingParams

HIDDEN, VOCAB = 576, 49152  # SmolLM2-135M
ROWS = (1, 16, 64)
REPEATS = 200


def _echo(rank: int, port: int) -> None:
    """Rank 1: receive each step's hidden states and residual, answer with its logits."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    for rows in ROWS:
        hidden, logits = torch.empty(rows, HIDDEN), torch.zeros(rows, VOCAB)
        for _ in range(REPEATS + 5):
            dist.recv(hidden, src=0)
            dist.recv(hidden, src=0)
            dist.send(logits, dst=0)
    dist.destroy_process_group()


def boundary_costs() -> dict[int, float]:
    """Microseconds of one step's round trip over a stage boundary, per batch size."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    peer = mp.get_context("spawn").Process(target=_echo, args=(1, store.port))
    peer.start()
    dist.init_process_group("gloo", store=store, rank=0, world_size=2)
    costs = {}
    for rows in ROWS:
        hidden, logits = torch.randn(rows, HIDDEN), torch.empty(rows, VOCAB)
        times = []
        for i in range(REPEATS + 5):
            started = time.perf_counter()
            dist.send(hidden, dst=1)
            dist.send(hidden, dst=1)
            dist.recv(logits, src=1)
            if i >= 5:
                times.append(time.perf_counter() - started)
        costs[rows] = statistics.median(times) * 1e6
    peer.join()
    dist.destroy_process_group()
    return costs


def tokens_per_second(llm: LLM, prompts: list[list[int]], tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(prompts, params)
    return len(prompts) * tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}\n")
    costs = boundary_costs()
    print("| rows | stage boundary round trip (hidden + residual out, fp32 logits back), us |")
    print("|---|---|")
    for rows, us in costs.items():
        print(f"| {rows} | {us:,.0f} |")
    prompts = [[100 + i + j for j in range(32)] for i in range(args.requests)]
    single, staged = LLM(), LLM(pipeline_parallel_size=2)
    depths = {1: "two stages, one batch in flight", 2: "two stages, a batch per stage"}
    runs: dict[str, list[float]] = {"one stage": [], **{name: [] for name in depths.values()}}
    tokens_per_second(single, prompts[:2], 4)  # warm both up
    tokens_per_second(staged, prompts[:2], 4)
    for _ in range(args.rounds):
        runs["one stage"].append(tokens_per_second(single, prompts, args.tokens))
        for depth, name in depths.items():
            staged.engine.batches_in_flight = depth
            runs[name].append(tokens_per_second(staged, prompts, args.tokens))
    staged.shutdown()
    print(
        f"\n{args.requests} requests x {args.tokens} tokens (32-token prompts), greedy, the "
        f"built-in model's defaults; median of {args.rounds} alternated rounds\n"
    )
    print("| engine | output tokens/s |")
    print("|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values):.1f} |")


if __name__ == "__main__":
    main()

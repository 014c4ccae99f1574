"""What tensor parallelism costs per step on this machine: sending the step's plan to the
workers (our pipes against a gloo broadcast), the collectives, and whole decode steps at
TP 1 against TP 3 on the built-in SmolLM2 (its head count allows 1 and 3).

    python benchmarks/tp_cost.py [--batches 1 16 64] [--steps 10]

Prints markdown tables (microseconds or milliseconds per step, medians).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 3
HIDDEN, VOCAB, LAYERS = 576, 49152, 30  # SmolLM2-135M
CONTEXT, BLOCK = 512, 16
REPEATS = 200


def decode_plan(batch: int):
    """The plan of a decode step of `batch` requests with CONTEXT-token contexts."""
    from kubellm.runtime.core.sampling_params import SamplingParams
    from kubellm.runtime.core.scheduler import ScheduledSequence, SchedulerOutput
    from kubellm.runtime.core.sequence import Sequence

    scheduled, blocks = [], CONTEXT // BLOCK
    for i in range(batch):
        request = Sequence(f"r{i}", list(range(CONTEXT)), SamplingParams(), frozenset(), 4096)
        request.num_computed_tokens = CONTEXT - 1
        request.block_ids = list(range(i * blocks, (i + 1) * blocks))
        scheduled.append(ScheduledSequence(request, 1))
    return SchedulerOutput(scheduled).plan(BLOCK)


def _join(rank: int, port: int, store=None) -> None:
    store = store or dist.TCPStore("127.0.0.1", port, WORLD, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)


def _worker(rank: int, port: int, pipe, batches: list[int]) -> None:
    torch.set_num_threads(1)
    _join(rank, port)
    for batch in batches:
        for _ in range(REPEATS):  # pipe, then barrier
            pickle.loads(pipe.recv_bytes())
            dist.barrier()
        for _ in range(REPEATS):  # broadcast, then barrier
            dist.broadcast_object_list([None], src=0)
            dist.barrier()
        x = torch.zeros(batch, HIDDEN)
        logits = torch.zeros(batch, VOCAB // WORLD)
        for _ in range(REPEATS):
            dist.all_reduce(x)
        for _ in range(REPEATS):
            dist.gather(logits, None, dst=0)
    for _ in range(REPEATS):
        dist.barrier()
    dist.destroy_process_group()


def _per_call(fn, repeats: int = REPEATS) -> float:
    """Median microseconds of one call."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def transfer_and_collectives(batches: list[int]) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    context = mp.get_context("spawn")
    pipes, workers = [], []
    for rank in range(1, WORLD):
        receive, send = context.Pipe(duplex=False)
        worker = context.Process(target=_worker, args=(rank, store.port, receive, batches))
        worker.start()
        pipes.append(send)
        workers.append(worker)
    _join(0, store.port, store)
    rows = []
    for batch in batches:
        plan = decode_plan(batch)
        size = len(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))

        def by_pipe(plan=plan) -> None:
            message = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            for pipe in pipes:
                pipe.send_bytes(message)
            dist.barrier()

        def by_broadcast(plan=plan) -> None:
            dist.broadcast_object_list([plan], src=0)
            dist.barrier()

        x = torch.zeros(batch, HIDDEN)
        logits = torch.zeros(batch, VOCAB // WORLD)
        parts = [torch.empty_like(logits) for _ in range(WORLD)]
        pipe_us, broadcast_us = _per_call(by_pipe), _per_call(by_broadcast)
        all_reduce_us = _per_call(lambda x=x: dist.all_reduce(x))
        gather_us = _per_call(lambda logits=logits, parts=parts: dist.gather(logits, parts, 0))
        rows.append(
            dict(
                batch=batch,
                bytes=size,
                pipe=pipe_us,
                broadcast=broadcast_us,
                all_reduce=all_reduce_us,
                gather=gather_us,
            )
        )
    barrier_us = _per_call(dist.barrier)
    for row in rows:  # the barrier that ends each transfer is not the transfer's
        row["pipe"] -= barrier_us
        row["broadcast"] -= barrier_us
    dist.destroy_process_group()
    for worker in workers:
        worker.join(30)
    return rows


def decode_step_ms(tensor_parallel_size: int, batch: int, steps: int) -> float:
    """Median wall time of one decode step of `batch` requests on SmolLM2."""
    from kubellm.runtime import LLM, SamplingParams

    with LLM(
        tensor_parallel_size=tensor_parallel_size,
        max_num_seqs=batch,
        max_model_len=1024,
        kv_cache_memory_gib=0.3,
    ) as llm:
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=steps + 20, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{i}", *engine.admission.admit([[100 + i] * 64], params))
        while any(r.num_computed_tokens < 64 for r in engine.scheduler.running) or (
            engine.scheduler.waiting
        ):
            engine.step()  # prefill first: what follows is decode only
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rows = transfer_and_collectives(args.batches)
    print(
        f"\nplan transfer to {WORLD - 1} workers and one collective, {WORLD} ranks (gloo), "
        f"microseconds (medians of {REPEATS})\n"
    )
    print(
        "| decode batch | plan bytes | pipes | gloo broadcast | all-reduce [batch, 576] "
        "| gather of logits |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['bytes']} | {r['pipe']:.0f} | {r['broadcast']:.0f} | "
            f"{r['all_reduce']:.0f} | {r['gather']:.0f} |"
        )
    print(
        f"\nSmolLM2 decode step, milliseconds ({2 * LAYERS + 1} all-reduces and 1 gather "
        f"per step at TP {WORLD})\n"
    )
    print(f"| decode batch | TP 1 | TP {WORLD} | collectives (estimated) | plan (pipes) |")
    print("|---|---|---|---|---|")
    for r in rows:
        single = decode_step_ms(1, r["batch"], args.steps)
        split = decode_step_ms(WORLD, r["batch"], args.steps)
        collectives = ((2 * LAYERS + 1) * r["all_reduce"] + r["gather"]) / 1e3
        print(
            f"| {r['batch']} | {single:.1f} | {split:.1f} | {collectives:.1f} | "
            f"{r['pipe'] / 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()

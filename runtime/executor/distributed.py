"""A rank's place among the engine's processes, passed explicitly to what uses it: its
tensor-parallel group (the layers' collectives) and its pipeline stage (hidden states in
from the stage before, out to the stage after).

Ranks join one `torch.distributed` world: NCCL on CUDA (a rank on its node's GPU
`local_rank`), gloo on CPU.
With T ranks per stage and P stages, rank r is tensor-parallel rank r % T of stage r // T;
a stage's T ranks have a group of their own when there are several stages. The
rendezvous is a TCPStore that rank 0 opens: on one node on a free port (port 0: the
kernel picks it), so two engines on one host never collide and nothing is left behind by
a crash; over several nodes on --master-port (`nodes.py`).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Collectives keep the ranks in lockstep; a rank that waits longer than this for its peers
# (a load far slower than theirs, a hung device) fails instead of hanging forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its stage's group: layers shard by `rank` and `size`."""

    rank: int = 0
    size: int = 1
    group: Any = None  # the stage's process group; None: the whole world (one stage)
    first: int = 0  # the world rank of the group's rank 0

    @property
    def is_driver(self) -> bool:
        """The group's rank 0, which gathers the logits."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's `x` concatenated along the last dimension; others: None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        dist.gather(x, parts, dst=self.first, group=self.group)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def shard(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's equal share of `total` items."""
        size = total // self.size
        return self.rank * size, size


SINGLE_RANK = TensorParallel()  # no tensor parallelism: every collective is a no-op


@dataclass(frozen=True)
class PipelineStage:
    """This rank's stage: which decoder layers it holds, and its peers (the ranks of the
    same tensor-parallel rank) in the stages before and after it."""

    index: int = 0
    size: int = 1
    layers: range = range(0)  # empty: every layer (one stage)
    stride: int = 1  # ranks per stage (T): a peer is this many world ranks away

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    def holds(self, layer: int) -> bool:
        return not self.layers or layer in self.layers

    def send(self, tensors: tuple[torch.Tensor, ...]) -> list[Any]:
        """To this rank's peer in the next stage, in order, without waiting: the works to
        wait on (the tensors, contiguous, must live until then). Not waiting lets rank 0 start its
        next batch, and collect an earlier one's logits, while the peer is still busy."""
        peer = dist.get_rank() + self.stride
        return [dist.isend(t, dst=peer) for t in tensors]

    def receive(self, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """From this rank's peer in the stage before: tensors shaped as `like`'s."""
        peer = dist.get_rank() - self.stride
        for t in like:
            dist.recv(t, src=peer)
        return like


ONE_STAGE = PipelineStage()


def stage_layers(num_layers: int, stages: int, index: int) -> range:
    """Stage `index`'s contiguous layers, as vLLM splits them: evenly, and where they do
    not divide, one more each for the stages just before the last (the last stage also
    runs the output head, the first the embedding)."""
    counts = [num_layers // stages] * stages
    for i in range(2, num_layers % stages + 2):
        counts[-i] += 1
    start = sum(counts[:index])
    return range(start, start + counts[index])


@dataclass(frozen=True)
class Parallel:
    """A rank's place among the engine's processes: its world rank, its tensor-parallel
    group and its pipeline stage. World rank 0 is the engine's own process: it schedules,
    and the last stage sends it the logits to sample."""

    rank: int = 0
    world_size: int = 1
    tp: TensorParallel = SINGLE_RANK
    pp: PipelineStage = ONE_STAGE

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def min(self, value: int) -> int:
        """The smallest `value` over every rank (the KV block count they all can hold)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def logits_to_driver(
        self, logits: torch.Tensor | None, rows: int, vocab: int, dtype: torch.dtype
    ):
        """The step's logits (of `dtype`) where the sampler is (world rank 0): sent there
        by the last stage's first rank when the stages are several; None on every other
        rank."""
        if self.pp.size == 1:
            return logits if self.is_driver else None
        device = _collective_device()
        if rows == 0:
            return torch.empty(0, vocab, dtype=dtype, device=device) if self.is_driver else None
        sender = (self.pp.size - 1) * self.pp.stride
        if self.rank == sender:
            assert logits.dtype == dtype, f"{logits.dtype} logits, {dtype} expected"
            dist.send(logits.contiguous(), dst=0)
            return None
        if not self.is_driver:
            return None
        received = torch.empty(rows, vocab, dtype=dtype, device=device)
        dist.recv(received, src=sender)
        return received


SINGLE_PROCESS = Parallel()


def open_store(world_size: int, port: int = 0) -> dist.TCPStore:
    """Rank 0's rendezvous, listening on every interface: on `port`, or (0) on a port the
    kernel picks."""
    return dist.TCPStore(
        "127.0.0.1",
        port,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=COLLECTIVE_TIMEOUT,
    )


def connect_store(host: str, port: int, world_size: int, timeout: float) -> dist.TCPStore:
    """A client of rank 0's store; RuntimeError if it does not answer within `timeout` s."""
    try:
        store = dist.TCPStore(
            host,
            port,
            world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=timeout),
        )
    except (RuntimeError, dist.DistError) as exc:
        raise RuntimeError(
            f"node 0's store at {host}:{port} did not answer within {timeout:g} s "
            f"(distributed_timeout): is `kubellm serve --node-rank 0` running there, and "
            f"reachable from here? ({exc})"
        ) from exc
    store.set_timeout(COLLECTIVE_TIMEOUT)
    return store


def join_group(
    rank: int,
    world_size: int,
    store: dist.TCPStore,
    device: torch.device,
    layout: tuple[int, int, int],
) -> Parallel:
    """Join the world through rank 0's `store`; `layout`: (tensor-parallel size, stages,
    the model's layers)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    return place(rank, world_size, *layout)


def place(rank: int, world_size: int, tp_size: int, stages: int, num_layers: int) -> Parallel:
    """Rank `rank`'s Parallel. Every rank makes every stage's group, in the same order
    (`new_group` is collective), and keeps its own."""
    index, tp_rank = divmod(rank, tp_size)
    group = None
    if stages > 1 and tp_size > 1:
        groups = [
            dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(stages)
        ]
        group = groups[index]
    tp = TensorParallel(tp_rank, tp_size, group, index * tp_size)
    layers = stage_layers(num_layers, stages, index) if stages > 1 else range(0)
    return Parallel(rank, world_size, tp, PipelineStage(index, stages, layers, tp_size))


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

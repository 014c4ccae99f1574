"""The tensor-parallel group a rank belongs to, passed explicitly to the layers that use it.

Ranks join one `torch.distributed` group: NCCL on CUDA (rank r on GPU r), gloo on CPU.
Its rendezvous is a TCPStore that rank 0 opens on a free port (port 0: the kernel picks
it), so two engines on one host never collide and nothing is left behind by a crash.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Collectives keep the ranks in lockstep; a rank that waits longer than this for its peers
# (a load far slower than theirs, a hung device) fails instead of hanging forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the group: layers shard by `rank` and `size`."""

    rank: int = 0
    size: int = 1

    @property
    def is_driver(self) -> bool:
        """Rank 0: the engine's own process, which samples."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's `x` concatenated along the last dimension; others: None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.is_driver else None

    def min(self, value: int) -> int:
        """The smallest `value` over the ranks (e.g. the KV block count they all can hold)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def shard(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's equal share of `total` items."""
        size = total // self.size
        return self.rank * size, size


SINGLE_RANK = TensorParallel()  # no tensor parallelism: every collective is a no-op


def open_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous on a port the kernel picks."""
    return dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=COLLECTIVE_TIMEOUT,
    )


def join_group(
    rank: int,
    world_size: int,
    port: int,
    device: torch.device,
    store: dist.TCPStore | None = None,
    ready_key: str | None = None,
) -> TensorParallel:
    """Join the group. Workers connect to rank 0's store on `port` and first set
    `ready_key` in it, so rank 0 knows they are alive before it waits in the rendezvous."""
    if store is None:
        store = dist.TCPStore(
            "127.0.0.1", port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT
        )
    if ready_key is not None:
        store.set(ready_key, "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    return TensorParallel(rank, world_size)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

"""torchrun support shared by every stage: process group, rank facts, sums, sharding.

`torchrun --nproc_per_node N <stage>.py ...` (or multi-node torchrun) sets WORLD_SIZE/RANK/LOCAL_RANK;
`setup(device)` then joins the process group (nccl on CUDA, gloo on CPU) and pins each rank to its GPU.
A plain `python <stage>.py` is a world of one, and every helper here is then a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from wmdd.cli import UserError, fail

# Ranks may finish their shares hours apart (recover on ImageNet): the default 10-30 min timeout is too short.
WAIT_TIMEOUT = timedelta(days=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0 only: one copy of every message however many ranks run."""
        if self.is_main:
            print(*args, **kwargs)


def setup(device: torch.device) -> tuple:
    """Join the torchrun process group if there is one. Returns (world, this rank's device)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def all_reduce_sum_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """In-place sum over ranks (float64 sums stay exact up to addition order)."""
    if world.enabled:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def barrier(world: World) -> None:
    if world.enabled:
        torch_dist.barrier()


def rank_slice(n: int, world: World) -> range:
    """This rank's contiguous block of range(n): blocks differ in size by at most one, none repeats."""
    per, extra = divmod(n, world.size)
    start = world.rank * per + min(world.rank, extra)
    return range(start, start + per + (1 if world.rank < extra else 0))


def wait_group(world: World):
    """A gloo group over every rank with a long timeout, for barriers and exchanging small objects."""
    return torch_dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if world.enabled else None


def gather_objects(obj, world: World, group) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a barrier too)."""
    if not world.enabled:
        return [obj]
    out = [None] * world.size
    torch_dist.all_gather_object(out, obj, group=group)
    return out


def settle(error, world: World, group) -> None:
    """Every rank calls this at the same point: re-raise this rank's UserError, or stop this rank too when
    another rank failed (every rank exits 2; nobody waits forever for a rank that stopped)."""
    messages = gather_objects(None if error is None else str(error), world, group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        fail(f"rank {failed[0][0]} of {world.size} stopped: {failed[0][1]}")


def on_main(fn, world: World, group):
    """fn() on rank 0 only (e.g. merging the shards every rank wrote); every rank then stops with its
    error if it failed, or gets its result."""
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except UserError as e:
            error = e
    settle(error, world, group)
    return gather_objects(result, world, group)[0]


def teardown(world: World) -> None:
    if world.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()

"""torch.distributed helpers: one place that knows whether we run under torchrun.

Every pass over rows (featurize into a store, the preconditioner's statistics, scoring) splits
its chunks by ``k % world == rank``; statistics are summed with ``all_reduce`` and score columns
or top-k lists gathered, so 2 ranks give the same answer as 1 (up to float summation order).
"""

from __future__ import annotations

import atexit
import os
from typing import NamedTuple

import torch
import torch.distributed as dist


class Shard(NamedTuple):
    """This process's share of every pass over rows: chunks k with k % world == rank."""
    rank: int = 0
    world: int = 1


def dist_info() -> Shard:
    """Shard(rank, world size); initialises the process group when launched by torchrun (gloo for
    CPU tensors, and nccl for CUDA tensors on a GPU machine after ``torch.cuda.set_device(LOCAL_RANK)``)."""
    if not dist.is_available():
        return Shard()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # CPU tensors (a model left on the CPU, host-side statistics) through gloo, CUDA through nccl
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
        # the group we opened is closed before interpreter teardown: left to static destructors,
        # gloo's threads are destroyed while joinable and a rank aborts ("terminate called
        # without an active exception", SIGABRT) after finishing its work
        atexit.register(_close)
    if dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum of ``t`` over ranks, in place (a no-op with one process). CPU tensors go through gloo;
    with nccl the tensor must live on this rank's GPU."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out

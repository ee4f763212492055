"""Scale-out under ``torchrun``: each rank embeds its own share of the slides.

Slides are independent, so ranks never exchange tensors; the process group (NCCL on GPU, gloo on CPU)
is only used to gather the per-rank summaries and error lists, so rank 0 writes one ``errors.csv``.
Output files are identical to a single-process run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and join the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        here = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local, initialised_here=here)


def shard(items: Sequence[T], rank: int, world_size: int, weights: Sequence[float] | None = None) -> list[T]:
    """This rank's share of ``items``: greedy balance by ``weights`` (e.g. file sizes), else round robin.

    Deterministic for the same ``items``/``weights``, so every rank computes the same split.
    """
    if world_size <= 1:
        return list(items)
    if weights is None:
        return list(items[rank::world_size])
    order = sorted(range(len(items)), key=lambda i: (-float(weights[i]), i))
    load = [0.0] * world_size
    owner = [0] * len(items)
    for i in order:
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += float(weights[i])
    return [items[i] for i in range(len(items)) if owner[i] == rank]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """All ranks' ``obj`` in rank order (just ``[obj]`` without a process group)."""
    if not info.distributed or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()

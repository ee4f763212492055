"""One process-group helper for every stage: where this process sits in a ``torchrun`` job.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
without them the run is a single process and nothing is joined. Pretraining uses the group for
DDP/FSDP2; embedding only to gather per-rank summaries. ``unwrap`` strips DDP / torch.compile wrappers.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process in the job: ``rank`` of ``world_size``, its GPU ``local_rank`` and ``device``.

    ``initialized``: the process group was joined by :func:`init_distributed` (and is left by
    :func:`cleanup_distributed`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, use_cuda: bool | None = None) -> DistInfo:
    """Join the process group of the torchrun environment (``WORLD_SIZE`` > 1), else a single process.

    ``use_cuda`` (default: CUDA is available) picks ``cuda:LOCAL_RANK`` (made current) and ``nccl``;
    otherwise the CPU and ``gloo``. A group that is already initialised is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if use_cuda is None else (use_cuda and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    here = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if cuda else "gloo"), device_id=device if cuda else None
        )
        here = True
    if _group_ready():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, here)
    return DistInfo(
        int(os.environ.get("RANK", "0")) if world > 1 else 0,
        world if world > 1 else 1,
        local_rank,
        device,
        False,
    )


def cleanup_distributed(info: DistInfo, graceful: bool = True) -> None:
    """Leave the process group if :func:`init_distributed` joined it.

    ``graceful`` (a run that ended normally on every rank): first a barrier, so no rank tears
    gloo's connections down while a peer still uses them, and a collection, so async work holding
    tensors is freed now rather than during interpreter exit (a SIGABRT there). After an error the
    peers may be stuck elsewhere, so the group is left at once.
    """
    if info.initialized and _group_ready():
        if graceful:
            dist.barrier()
            gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed and _group_ready():
        dist.barrier()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """All ranks' ``obj`` in rank order (just ``[obj]`` without a process group)."""
    if not info.distributed or not _group_ready():
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers, however nested (fully_shard-ed modules are
    returned as they are: FSDP2 adds no wrapper)."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        else:
            return module

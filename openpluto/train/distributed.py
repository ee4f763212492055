"""Process group from the plain ``torchrun`` environment, DDP / FSDP2 wrapping, small collectives.

``torchrun --nproc-per-node G [--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m openpluto.cli.main
pretrain ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; without them
the run is a single process and nothing is wrapped. Rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment (``WORLD_SIZE`` > 1), else single process.

    Picks ``nccl`` with one GPU per ``LOCAL_RANK`` when CUDA is available, ``gloo`` on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(0, 1, 0, device, False)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if cuda else "gloo"), device_id=device if cuda else None
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def cleanup_distributed(info: DistInfo) -> None:
    if info.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def any_across_ranks(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if not info.initialized:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank (e.g. the EMA teacher under DDP)."""
    if not info.initialized:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def wrap_ddp(
    student: nn.Module,
    info: DistInfo,
    bucket_cap_mb: int = 360,
    gradient_as_bucket_view: bool = True,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """DDP with the paper's bucket settings (``bucket_cap_mb=360``, ``gradient_as_bucket_view=True``)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        student,
        device_ids=[info.local_rank] if info.device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        gradient_as_bucket_view=gradient_as_bucket_view,
        find_unused_parameters=find_unused_parameters,
    )


def shard_fsdp2(module: nn.Module, info: DistInfo, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): each ``backbone.blocks[i]`` then the whole module.

    Used for the student and the teacher alike, so both hold identically laid-out shards and the EMA
    update stays shard-local.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    backbone = getattr(module, "backbone", module)
    for block in getattr(backbone, "blocks", []):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return module

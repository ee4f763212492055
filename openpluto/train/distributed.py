"""DDP / FSDP2 wrapping and small collectives for pretraining; the process group is in openpluto.distributed.

``torchrun --nproc-per-node G [--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m openpluto.cli.main
pretrain ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; without them
the run is a single process and nothing is wrapped. Rank 0 alone writes files.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from openpluto.distributed import DistInfo


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

"""The one process-group helper (openpluto.distributed) and the cohort split of ``--shard I/N``."""

import pytest

from openpluto.distributed import DistInfo, gather_objects, init_distributed, unwrap
from openpluto.errors import ConfigError
from openpluto.jobs.shard import Shard, split


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_split_partitions_items(world, weighted):
    items = [f"s{i}" for i in range(11)]
    weights = [float((i * 7) % 5 + 1) for i in range(11)] if weighted else None
    parts = [split(items, r, world, weights) for r in range(world)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == sorted(items) and len(flat) == len(items)
    assert all(p == [x for x in items if x in p] for p in parts)  # order kept within a rank
    if weighted:
        loads = [sum(weights[items.index(x)] for x in p) for p in parts]
        assert max(loads) - min(loads) <= max(weights)
    else:
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_from_flag_slurm_array_and_torchrun():
    assert Shard.parse("1/4", env={}) == Shard(1, 4)
    assert Shard.parse(None, env={}) == Shard(0, 1)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "10"}
    assert Shard.parse(None, env=slurm) == Shard(6, 10)
    assert Shard.parse("", env={"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    assert Shard.parse(None, env={**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == Shard(13, 20)
    assert Shard.parse("2/3", env=slurm) == Shard(2, 3)  # the flag wins over the array
    for bad in ("3/3", "1-of-2", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            Shard.parse(bad, env={})


def test_single_process_defaults(monkeypatch):
    import torch

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(use_cuda=False)
    assert info == DistInfo() and info.is_main and not info.distributed
    assert gather_objects({"a": 1}, info) == [{"a": 1}]
    inner = torch.nn.Linear(2, 2)
    wrapped = torch.nn.Module()
    wrapped.module = torch.compile(inner) if hasattr(torch, "compile") else inner
    assert unwrap(wrapped) is inner  # DDP-like .module around torch.compile's _orig_mod

"""``torchrun --nproc-per-node 2`` on CPU (gloo): DDP and FSDP2 agree across ranks, rank 0 writes once.

The FSDP2 case (``fully_shard`` over a gloo CPU mesh) passes too but is marked slow to keep the default
suite within its time budget: ``pytest -m slow tests/train/test_distributed.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import TINY
from train_helpers import write_shards

HANG_GUARD_S = 1800  # only a deadlock gets near this; no verdict depends on speed

REPO = Path(__file__).resolve().parents[2]


def _torchrun(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "openpluto.cli.main",
        "pretrain",
        "--config",
        "cpu-tiny",
        "--data",
        str(data),
        "--out",
        str(run),
        *TINY,
        "max_steps=3",
        "log.checkpoint_every=100",
        "log.tensorboard=false",
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_agree(tmp_path, strategy):
    data = write_shards(tmp_path / "tiles", 16, per_shard=8, size=48)
    run = tmp_path / "run"
    res = _torchrun(data, run, f"dist.strategy={strategy}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["global_batch"] == 8
    assert summary["ranks_agree"] == {"patch_sizes": True, "weights": True}
    files = sorted(p.name for p in run.iterdir())
    assert files.count("checkpoint.pt") == 1 and not [f for f in files if f.endswith(".tmp")]
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and ck["world_size"] == 2 and ck["data_position"] == 3
    assert any(k.startswith("student.backbone.blocks.0.") for k in ck["model"])  # full, unwrapped names
    assert all(not k.startswith("student.module.") for k in ck["model"])

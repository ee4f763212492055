"""Checkpoint files (weights_only, atomic, never NaN) and the deterministic, resumable data order."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from train_helpers import write_folder, write_shards

from openpluto.train.checkpoint import (
    CheckpointError,
    full_state,
    load_checkpoint,
    load_full_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from openpluto.train.data import DataError, PositionViews, StreamSampler, build_loader, find_samples


def _model_and_opt():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": list(m.parameters()), "names": ["a"] * 6, "lr_mult": 0.5}], lr=1e-2)
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    return m, opt


def test_checkpoint_roundtrip_weights_only_and_rng(tmp_path):
    m, opt = _model_and_opt()
    msd, osd = full_state(m, opt)
    random.random(), np.random.rand(), torch.rand(1)
    state = {
        "model": msd,
        "optimizer": osd,
        "step": 7,
        "data_position": 14,
        "rng": rng_state(),
        "config": {"seed": 0, "patch_sizes": [8, 16]},
    }
    assert save_checkpoint(tmp_path / "checkpoint.pt", state)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain types + tensors only
    assert ck["step"] == 7 and ck["data_position"] == 14
    set_rng_state(ck["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expect
    m2, opt2 = _model_and_opt()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    load_full_state(m2, opt2, ck["model"], ck["optimizer"])
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr_mult"] == 0.5
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoint_with_nan_is_never_written(tmp_path):
    m, opt = _model_and_opt()
    msd, osd = full_state(m, opt)
    msd["0.weight"][0, 0] = float("nan")
    assert not save_checkpoint(tmp_path / "checkpoint.pt", {"model": msd, "optimizer": osd})
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def _ident(img):
    return torch.from_numpy(np.array(img)).float().mean() + torch.rand(1)  # content + seeded randomness


def _collate(xs):
    return torch.stack([x.reshape(-1) for x in xs])


def test_shards_found_recursively_and_indexed(tmp_path):
    write_shards(tmp_path / "a", 10, per_shard=4, size=32)
    write_shards(tmp_path / "b" / "deeper", 5, per_shard=5, size=32)
    ds = find_samples(tmp_path)
    assert len(ds) == 15 and len(ds.sources) == 4
    assert ds[0].size == (32, 32) and ds[14].mode == "RGB"
    write_folder(tmp_path / "imgs", 6, size=32)
    assert len(find_samples(tmp_path / "imgs")) == 6
    with pytest.raises(DataError, match="does not exist"):
        find_samples(tmp_path / "missing")
    (tmp_path / "empty2").mkdir()
    with pytest.raises(DataError, match="run `openpluto tiles`"):
        find_samples(tmp_path / "empty2")


def test_order_is_independent_of_workers_split_by_rank_and_resumable(tmp_path):
    write_shards(tmp_path, 12, per_shard=5, size=32)
    ds = find_samples(tmp_path)

    def batches(start, workers, rank=0, world=1, n=5):
        it = iter(
            build_loader(
                ds,
                _ident,
                _collate,
                3,
                seed=1,
                rank=rank,
                world_size=world,
                start_micro_batch=start,
                num_workers=workers,
            )
        )
        return [next(it) for _ in range(n)]

    ref = batches(0, 0)
    for a, b in zip(ref, batches(0, 2)):
        assert torch.equal(a, b)  # workers only split the loading
    for a, b in zip(ref[2:], batches(2, 0, n=3)):
        assert torch.equal(a, b)  # resume at micro-batch 2
    # two ranks cut every global batch into disjoint halves
    it0, it1 = iter(StreamSampler(3, 0, 2)), iter(StreamSampler(3, 1, 2))
    r0 = [next(it0) for _ in range(12)]
    r1 = [next(it1) for _ in range(12)]
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(24))
    # each epoch visits every sample exactly once, in a seeded order that changes between epochs
    views = PositionViews(ds, _ident, seed=1)
    e0 = [views.sample_index(p) for p in range(12)]
    e1 = [views.sample_index(p) for p in range(12, 24)]
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1

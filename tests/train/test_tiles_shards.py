"""``tiles --shard I/N`` in several processes gives exactly one run's tiles; pretraining reads them alike.

Also: the shards are webdataset's (plain ``webdataset.WebDataset`` reads them) and pretraining reads them
with ``wids``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from _parking import cli_command
from test_trainer import TINY

from openpluto.slide import TilesConfig
from openpluto.slide.tiles import read_tile_manifest, run_tiles
from openpluto.train.config import load_train_config
from openpluto.train.data import ShardSamples, find_samples
from openpluto.train.metrics import read_metrics
from openpluto.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--mpp", "1", "--tile-size", "64", "--tiles-per-slide", "6", "--shard-size", "4", "--no-qc"]


@pytest.fixture(scope="module")
def one_and_sharded(synth_cohort, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    one, sharded = root / "one", root / "sharded"
    cfg = TilesConfig(mpp=(1.0,), tile_size=(64,), tiles_per_slide=6, shard_size=4, qc=False)
    assert run_tiles([synth_cohort[0].parent], one, cfg, progress=False)["slides_ok"] == 3
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    tiles = cli_command("tiles", str(synth_cohort[0].parent), "--out", str(sharded), *ARGS)
    procs = [subprocess.Popen([*tiles, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=1800)  # a hang guard only
        assert p.returncode == 0, err[-2000:]
    return one, sharded


def test_two_shards_give_the_tiles_of_one_run(one_and_sharded):
    one, sharded = one_and_sharded
    tars = sorted(p.name for p in (one / "shards").glob("*.tar"))
    assert tars == sorted(p.name for p in (sharded / "shards").glob("*.tar")) and len(tars) >= 6
    for name in tars:  # same keys, same pixels: byte for byte
        assert (one / "shards" / name).read_bytes() == (sharded / "shards" / name).read_bytes(), name
    assert (sharded / "manifest.part-0-of-2.csv").is_file() and (
        sharded / "manifest.part-1-of-2.csv"
    ).is_file()
    assert not (sharded / "manifest.csv").exists()
    key = lambda r: r["key"]  # noqa: E731
    assert sorted(read_tile_manifest(one), key=key) == sorted(read_tile_manifest(sharded), key=key)
    assert sum(1 for _ in read_tile_manifest(sharded)) == 18


def test_shards_are_plain_webdataset_and_read_with_wids(one_and_sharded):
    import webdataset as wds

    one, sharded = one_and_sharded
    urls = [str(p) for p in sorted((sharded / "shards").glob("*.tar"))]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(keys) == sorted(r["key"] for r in read_tile_manifest(one))
    ds = find_samples(sharded)
    assert isinstance(ds, ShardSamples) and len(ds) == 18
    assert ds[17].size == (64, 64) and ds[0].mode == "RGB"


def test_pretraining_on_the_union_equals_pretraining_on_one_run(one_and_sharded, tmp_path):
    runs = {}
    for name, data in zip(("one", "sharded"), one_and_sharded):
        cfg = load_train_config("cpu-tiny", [*TINY, f"data.path={data}", "max_steps=3"])
        pretrain(cfg, tmp_path / name)
        runs[name] = tmp_path / name
    losses = {k: [r["total"] for r in read_metrics(v / "metrics.csv")] for k, v in runs.items()}
    assert len(losses["one"]) == 3 and losses["one"] == losses["sharded"]
    a, b = (torch.load(v / "checkpoint.pt", weights_only=True)["model"] for v in runs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Slow: ``cpu-tiny`` pretrained for 400 steps on 3,000 real H&E tiles beats its random twin on real
labelled tiles (LC25000 lung, 3 classes) by >= 0.10 balanced accuracy on kNN and on the linear probe,
beyond the spread of the random seeds (``benchmarks/real_learning.py`` at its defaults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_tiny_learns_on_real_tissue(patches_dir, tmp_path):
    unlabeled, labelled = patches_dir / "lc25000_lung_unlabeled", patches_dir / "lc25000_lung_dev"
    if not (unlabeled.is_dir() and labelled.is_dir()):
        pytest.skip(f"LC25000 sets not present in {patches_dir}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "real_learning.py"), "--out", str(tmp_path),
         "--unlabeled", str(unlabeled), "--labelled", str(labelled), "--device", "cpu"],
        env=env, check=True, timeout=3 * 3600,
    )
    res = json.loads((tmp_path / "real_learning.json").read_text())
    assert res["steps"] == 400, res["steps"]
    for probe, m in res["summary"]["margins"].items():
        assert m["over_random_mean"] >= 0.10, (probe, m)
        assert m["over_best_random_seed"] >= 0.10, (probe, m)  # beyond the spread of the random seeds
    assert res["diagnostics"]["last_losses"]["student_feat_std"] > 0.01  # no collapse


def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_learning", REPO / "benchmarks" / "real_learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_screening_probes_and_margins():
    """kNN and the logreg screening probe separate three Gaussian blobs and not shuffled labels; the
    margin over the random twins is paired split by split."""
    import numpy as np

    rl = _load_benchmark()
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 16)).astype(np.float32) + 6.0 * np.eye(16, dtype=np.float32)[y]
    splits = rl.make_splits(y, 3, 0.2, 0.2)
    good = rl.probe_scores(x, y, splits, 3, linear="logreg")
    noise = rl.probe_scores(rng.normal(size=x.shape).astype(np.float32), y, splits, 3, linear="logreg")
    assert min(good["knn"]) > 0.9 and min(good["linear"]) > 0.9
    assert np.mean(noise["knn"]) < 0.6 and np.mean(noise["linear"]) < 0.6
    summary = rl.summarise({"trained": good, "random_seed0": noise}, ["random_seed0"])
    for p in rl.PROBES:
        margin = summary["margins"][p]["over_random_mean"]
        assert margin == pytest.approx(np.mean(good[p]) - np.mean(noise[p]))

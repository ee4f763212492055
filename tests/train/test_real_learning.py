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

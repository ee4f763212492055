"""Slow: ``cpu-tiny`` pretrained for 400 steps on 3,000 real H&E tiles against its random twin on real
labelled tiles (LC25000 lung, 3 classes), kNN and the linear probe (``benchmarks/real_learning.py`` at
its defaults): the margins reached today are guarded; issue 14's +0.10 target is asserted for kNN
and a strict xfail for the linear probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_result(patches_dir, tmp_path_factory) -> dict:
    """``benchmarks/real_learning.py`` at its defaults, run once for the tests below."""
    unlabeled, labelled = patches_dir / "lc25000_lung_unlabeled", patches_dir / "lc25000_lung_dev"
    if not (unlabeled.is_dir() and labelled.is_dir()):
        pytest.skip(f"LC25000 sets not present in {patches_dir}")
    out = tmp_path_factory.mktemp("real_learning")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "real_learning.py"), "--out", str(out),
         "--unlabeled", str(unlabeled), "--labelled", str(labelled), "--device", "cpu"],
        env=env, check=True, timeout=3 * 3600,  # a hang guard only: the work is fixed by the step count
    )
    res = json.loads((out / "real_learning.json").read_text())
    assert res["steps"] == 400, res["steps"]
    assert res["diagnostics"]["last_losses"]["student_feat_std"] > 0.01  # no collapse
    return res


def _beyond_seed_spread(m: dict) -> bool:
    """The trained mean lies above the best random seed by more than the seeds' own range."""
    lo, hi = m["random_seed_range"]
    return m["over_best_random_seed"] > hi - lo


@pytest.mark.slow
def test_cpu_tiny_beats_its_random_twin_on_real_tissue(real_result):
    """What the recipe achieves today (+0.117 kNN, +0.080 linear over the twins' mean): kept, not lost."""
    margins = real_result["summary"]["margins"]
    assert margins["knn"]["over_random_mean"] >= 0.09, margins["knn"]
    assert margins["linear"]["over_random_mean"] >= 0.06, margins["linear"]
    for probe, m in margins.items():
        assert _beyond_seed_spread(m), (probe, m)


@pytest.mark.slow
def test_cpu_tiny_knn_reaches_the_target_margin(real_result):
    """Issue 14's target on the kNN probe: +0.10 over the random twin, beyond the seeds' spread. Met at
    the benchmark's default training seed (0, +0.117) and seed 1 (+0.107); seed 2 reaches +0.090 (README)."""
    m = real_result["summary"]["margins"]["knn"]
    assert m["over_random_mean"] >= 0.10 and _beyond_seed_spread(m), m


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 14's target is not met on the linear probe yet: +0.080 at "
                   "400 steps; this fails (XPASS) once a recipe reaches it, so the mark must then go")
def test_cpu_tiny_linear_reaches_the_target_margin(real_result):
    m = real_result["summary"]["margins"]["linear"]
    assert m["over_random_mean"] >= 0.10 and _beyond_seed_spread(m), m


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


def test_last_logged_reads_a_reused_run(tmp_path):
    """A finished run reused by the benchmark takes no step, so its last values come from metrics.csv."""
    rl = _load_benchmark()
    (tmp_path / "metrics.csv").write_text("step,teacher_entropy,total\n5,4.5,7.0\n10,1.6,6.2\n")
    assert rl.last_logged({}, tmp_path) == {"step": 10.0, "teacher_entropy": 1.6, "total": 6.2}
    assert rl.last_logged({"last": {"total": 1.0}}, tmp_path) == {"total": 1.0}
    assert rl.last_logged({}, tmp_path / "missing") == {}


def test_probe_every_probes_each_kept_teacher(tmp_path):
    """``--probe-every 2`` on a 4-step run: the teacher kept at step 2 is exported, probed on the same
    splits and tabulated beside the final one, its margin over the same random twins."""
    from test_trainer import TINY
    from train_helpers import write_folder

    rl = _load_benchmark()
    unlabeled = write_folder(tmp_path / "unlabeled", 24, size=48)
    labelled = write_folder(tmp_path / "labelled", 30, size=48, seed=1)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--unlabeled", str(unlabeled), "--labelled", str(labelled), "--device", "cpu",
            "--max-steps", "4", "--probe-every", "2", "--splits", "2", "--random-seeds", "1",
            "--linear", "logreg", *TINY]
    assert rl.main(argv) == 0
    res = json.loads((out / "real_learning.json").read_text())
    assert res["steps"] == 4 and [r["step"] for r in res["trajectory"]] == [2]
    assert (out / "models" / "step_0000002" / "model.safetensors").is_file()
    row, margins = res["trajectory"][0], res["summary"]["margins"]
    for p in rl.PROBES:
        assert 0.0 <= row[p] <= 1.0
        assert row[f"{p}_margin"] == pytest.approx(row[p] - margins[p]["random_mean"])
    table = (out / "real_learning.md").read_text()
    assert "| teacher at step |" in table and "\n| 2 | " in table and "\n| 4 | " in table

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


def _load_script(name: str):
    """``benchmarks/NAME.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_benchmark():
    return _load_script("real_learning")


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


def _load_bounds():
    return _load_script("probe_bounds")


def test_tile_errors_counts_each_test_appearance():
    """Error rate and most frequent wrong class per tile, and the confusion matrix, over two splits."""
    import numpy as np

    pb = _load_bounds()
    y = np.array([0, 1, 2, 0])
    splits = [np.array(["test", "test", "train", "val"]), np.array(["train", "test", "test", "test"])]
    errors = pb.tile_errors(y, splits, [np.array([0, 2]), np.array([2, 2, 1])], 3)
    assert errors["error_rate"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert errors["taken_for"][[1, 3]].tolist() == [2, 1]
    assert errors["confusion"].tolist() == [[1, 1, 0], [0, 0, 2], [0, 0, 1]]
    untested = pb.tile_errors(y, splits[:1], [np.array([0, 2])], 3)["error_rate"]
    assert np.isnan(untested[2:]).all()


def test_probe_bounds_on_a_finished_run(tmp_path):
    """``probe_bounds.py`` on a 4-step run of generated folders: tuned classifiers for the trained
    encoder and its twin beside the run's own linear score, one split of supervised training from the
    teacher and from scratch, a confusion matrix over every test appearance, and the picture; a folder
    without a run is a one-line error."""
    import numpy as np
    from test_trainer import TINY
    from train_helpers import write_folder

    rl, pb = _load_benchmark(), _load_bounds()
    unlabeled = write_folder(tmp_path / "unlabeled", 24, size=48)
    labelled = write_folder(tmp_path / "labelled", 40, size=48, seed=1)
    out = tmp_path / "out"
    assert rl.main(["--out", str(out), "--unlabeled", str(unlabeled), "--labelled", str(labelled),
                    "--device", "cpu", "--max-steps", "4", "--splits", "3", "--random-seeds", "1",
                    "--linear", "logreg", *TINY]) == 0
    assert pb.main(["--out", str(out), "--supervised-splits", "1", "--epochs", "2", "--patience", "1"]) == 0
    res = json.loads((out / "probe_bounds.json").read_text())
    run = json.loads((out / "real_learning.json").read_text())
    assert set(res["classifiers"]) == {"trained", "random_seed0"}
    for label, row in res["classifiers"].items():
        assert row["eva_linear"] == run["summary"]["rows"][label]["linear"]["mean"]
        for probe in ("logreg", "svm"):
            assert len(row[probe]["runs"]) == 3 and 0.0 <= row[probe]["mean"] <= 1.0
    assert {k: len(v["runs"]) for k, v in res["supervised"].items()} == {"fine-tuned": 1, "scratch": 1}
    splits = rl.make_splits(np.array([i % 2 for i in range(40)]), 3, 0.2, 0.2)
    assert np.sum(res["errors"]["confusion"]) == sum(int((s == "test").sum()) for s in splits)
    assert (out / "hard_tiles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| trained |" in (out / "probe_bounds.md").read_text()
    with pytest.raises(SystemExit, match="no finished real_learning run"):
        pb.main(["--out", str(tmp_path / "nothing")])

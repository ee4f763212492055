"""The demo's pretraining step decides by steps: run, skip, resume or refuse; its estimate and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openpluto.demo.commands import SKIPPED, CommandLog
from openpluto.demo.config import DemoConfig
from openpluto.demo.estimate import StepEstimate, estimate_line
from openpluto.demo.evaluation import Score, TaskResult
from openpluto.demo.pretraining import PretrainOutcome, run_pretraining
from openpluto.demo.summary import DemoSummary
from openpluto.errors import OpenPlutoError


class _FakeTrainer(CommandLog):
    """Records the commands; "trains" by writing the run's checkpoint and summary (``stop_at`` steps)."""

    def __init__(self, path: Path, stop_at: int | None = None) -> None:
        super().__init__(path)
        self.ran: list[list[str]] = []
        self.stop_at = stop_at

    def run(self, argv):
        self.ran.append(list(argv))
        self._append(" ".join(argv))
        run = Path(argv[argv.index("--out") + 1])
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoint.pt").write_bytes(b"")
        target = int(argv[argv.index("--max-steps") + 1])
        (run / "summary.json").write_text(json.dumps({"steps": min(target, self.stop_at or target)}))


def test_pretraining_runs_skips_resumes_and_refuses(tmp_path, capsys):
    cfg = DemoConfig(out=str(tmp_path), steps=6)
    log = _FakeTrainer(tmp_path / "commands.txt", stop_at=4)  # as if a cap stopped it at step 4
    first = run_pretraining(cfg, tmp_path, log)
    assert first.ran and first.steps == 4 and first.cut_short and log.ran[0][:3] == ["pretrain", "--config",
                                                                                         "cpu-tiny"]
    log.stop_at = None
    resumed = run_pretraining(cfg, tmp_path, log)  # a rerun finishes the remaining steps
    assert resumed.ran and resumed.steps == 6 and not resumed.cut_short
    assert log.ran[1] == ["pretrain", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "6"]
    capsys.readouterr()
    again = run_pretraining(cfg, tmp_path, log)  # finished: skipped, and said so
    assert not again.ran and again.steps == 6 and len(log.ran) == 2
    out = capsys.readouterr().out
    assert "done earlier" in out and "pretraining for" not in out
    history = log.history().splitlines()
    assert history[-1].startswith(SKIPPED + "openpluto pretrain --config cpu-tiny") and len(history) == 3
    with pytest.raises(OpenPlutoError, match="--steps 6, or --fresh"):
        run_pretraining(DemoConfig(out=str(tmp_path), steps=5), tmp_path, log)


def test_estimate_after_the_first_steps_and_where_a_cap_stops(tmp_path):
    assert "about 10.0 min" in estimate_line(1.5, 0, 400, None)
    capped = estimate_line(1.5, 0, 400, 5.0)
    assert "cap will stop it near step 200 of 400" in capped
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,total\n20,9.0\n")  # a row of the run being resumed: not timed
    est = StepEstimate(csv, target=100, after_steps=10)
    assert est.observe(20, 0.0) is None and est.observe(21, 100.0) is None  # first new step at t = 100 s
    assert est.observe(26, 110.0) is None  # 5 steps: too few to say
    line = est.observe(31, 120.0)  # 10 steps in 20 s
    assert line == est.line and "2.00 s per pretraining step" in line
    assert "the 69 steps left take about 2.3 min" in line


def _summary(steps: int, target: int, margins: tuple[float, float]) -> DemoSummary:
    runs = {"knn": 1, "linear": 3}
    results = [TaskResult(t, Score(0.7 + m, 0.0, runs[t]), Score(0.7, 0.0, runs[t]), 360, 1080, 6, "test")
               for t, m in zip(("knn", "linear"), margins)]
    return DemoSummary(4, 1284, 258, PretrainOutcome(steps, target, "max_steps", 1.0), results)


def test_summary_says_when_a_cap_cut_the_run_short_and_what_to_expect():
    full = _summary(400, 400, (0.15, 0.12))
    assert full.clear_win and not full.cut_short_note()
    assert "NOT" not in "\n".join(full.lines())
    short = _summary(72, 400, (0.06, 0.005))
    text = "\n".join(short.lines())
    assert not short.clear_win and "does NOT beat" in text
    assert "cut short by the --minutes cap: 72 of 400 steps" in text and "expect smaller margins" in text
    assert "chance 0.167" in text and "360 held-out test tiles of 6 classes" in text
    assert "± 0.000" not in text.split("\n")[3]  # one kNN run: no ±

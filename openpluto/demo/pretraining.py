"""The demo's pretraining step: ``cpu-tiny`` for a fixed number of steps, resumable, optionally capped.

The length is counted in steps (``--steps``), so the encoder and the demo's result are the same on
a fast or a busy machine; only the wall time differs. ``--minutes`` caps the time: the trainer stops
at the next step boundary, checkpoints, and the demo goes on with the shorter run (and says so).

``RUN/demo_pretrain.json`` records what the folder holds: ``{"steps", "target", "stopped_by",
"minutes"}``. A rerun skips a finished run, resumes one that was killed or capped, and refuses one
made with more steps than asked for.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from openpluto.demo.commands import CommandLog
from openpluto.demo.config import PRESET, DemoConfig
from openpluto.demo.estimate import StepEstimate
from openpluto.errors import OpenPlutoError

MARKER = "demo_pretrain.json"


@dataclass
class PretrainOutcome:
    steps: int  # optimizer steps the run holds
    target: int  # steps asked for (--steps)
    stopped_by: str  # "max_steps" or "max_minutes"
    minutes: float  # wall time of the pretraining this invocation ran (0 when skipped)
    ran: bool = False  # this invocation trained (so later outputs are stale)

    @property
    def cut_short(self) -> bool:
        return self.steps < self.target


def pretrain_command(cfg: DemoConfig, out: Path, resume: bool) -> list[str]:
    run = out / "run"
    if resume:
        return ["pretrain", "--out", str(run), "--resume", "--max-steps", str(cfg.steps)]
    return ["pretrain", "--config", PRESET, "--data", str(out / "tiles"), "--out", str(run),
            "--max-steps", str(cfg.steps), f"seed={cfg.seed}"]


def _read_marker(run: Path) -> PretrainOutcome | None:
    p = run / MARKER
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    return PretrainOutcome(int(d["steps"]), int(d["target"]), str(d["stopped_by"]), float(d["minutes"]))


def _steps_done(run: Path) -> int:
    """Steps of the run's last checkpoint, from the trainer's summary (0 if none)."""
    s = run / "summary.json"
    return int(json.loads(s.read_text())["steps"]) if s.is_file() else 0


class _TimeCap:
    """Until the trainer's own ``max_minutes`` is available: SIGTERM ourselves after ``minutes``.

    The trainer checkpoints and stops at the next step boundary when SIGTERM arrives.
    """

    def __init__(self, minutes: float | None) -> None:
        self.minutes, self.fired, self._timer = minutes, False, None

    def _fire(self) -> None:
        self.fired = True
        os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> _TimeCap:
        if self.minutes is not None:
            self._timer = threading.Timer(self.minutes * 60, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()


def run_pretraining(cfg: DemoConfig, out: Path, log: CommandLog) -> PretrainOutcome:
    """Pretrain (or resume, or skip) ``cpu-tiny`` in ``OUT/run`` to ``cfg.steps`` steps."""
    run = out / "run"
    prev = _read_marker(run)
    if prev is not None and prev.steps > cfg.steps:
        raise OpenPlutoError(f"{run} already holds {prev.steps} pretraining steps, more than --steps "
                             f"{cfg.steps}: rerun with --steps {prev.steps}, or --fresh to start over")
    if prev is not None and prev.steps == cfg.steps:
        log.skip(pretrain_command(cfg, out, resume=False), f"{prev.steps} steps in {run}")
        return prev
    resume = (run / "checkpoint.pt").is_file()
    cap = f", capped at {cfg.minutes:g} min" if cfg.minutes is not None else ""
    if resume:
        print(f"continuing the pretraining in {run} from step {_steps_done(run)} to {cfg.steps}{cap}")
    else:
        print(f"pretraining for {cfg.steps} steps{cap}; an estimate of the time follows the first steps")
    estimate = StepEstimate(run / "metrics.csv", cfg.steps, cfg.minutes)
    estimate.start()
    t0 = time.time()
    try:
        with _TimeCap(cfg.minutes) as cap:
            log.run(pretrain_command(cfg, out, resume))
    finally:
        estimate.stop()
    steps = _steps_done(run)
    outcome = PretrainOutcome(steps, cfg.steps, "max_minutes" if cap.fired and steps < cfg.steps
                              else "max_steps", round((time.time() - t0) / 60, 2), ran=True)
    d = asdict(outcome)
    d.pop("ran")
    (run / MARKER).write_text(json.dumps(d) + "\n")
    return outcome

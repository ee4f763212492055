"""Say how long pretraining will take, from the first steps of the run (read from ``metrics.csv``).

The trainer appends a row to ``RUN/metrics.csv`` every few steps. A background thread notes when the
first rows appear and, once ``after_steps`` more steps are logged, prints the measured time per step
and the time left for the run (and where a ``--minutes`` cap will stop it).
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path


def _last_step(path: Path) -> int | None:
    try:
        with open(path, newline="") as f:
            steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]
    except (OSError, ValueError, KeyError, csv.Error):  # not there yet, or a row half written
        return None
    return steps[-1] if steps else None


def estimate_line(s_per_step: float, done: int, target: int, cap_minutes: float | None) -> str:
    """One line: the measured rate, the time left, and the step a ``cap_minutes`` cap stops at."""
    left_min = s_per_step * (target - done) / 60
    line = (f"estimate: {s_per_step:.2f} s per pretraining step on this machine now: the {target - done} "
            f"steps left take about {left_min:.1f} min")
    if cap_minutes is not None and left_min > cap_minutes:
        stop = done + int(cap_minutes * 60 / s_per_step)
        line += (f"; the --minutes {cap_minutes:g} cap will stop it near step {stop} of {target}, and a "
                 "shorter run learns less")
    return line


class StepEstimate(threading.Thread):
    """Print ``estimate_line`` once, ``after_steps`` steps after the first logged step."""

    def __init__(self, metrics_csv: str | Path, target: int, cap_minutes: float | None = None,
                 after_steps: int = 10, poll_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.metrics_csv, self.target, self.cap = Path(metrics_csv), target, cap_minutes
        self.after_steps, self.poll_s = after_steps, poll_s
        self.line: str | None = None
        self.before = _last_step(self.metrics_csv)  # rows of an earlier (resumed) run are not timed
        self._first: tuple[int, float] | None = None
        self._stop_event = threading.Event()

    def observe(self, step: int | None, now: float) -> str | None:
        """Feed the last logged step seen at time ``now`` (s); the estimate once enough steps passed."""
        if step is None or step == self.before:
            return None
        if self._first is None:
            self._first = (step, now)
            return None
        if step - self._first[0] < self.after_steps:
            return None
        s_per_step = (now - self._first[1]) / (step - self._first[0])
        self.line = estimate_line(s_per_step, step, self.target, self.cap)
        return self.line

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            if self.observe(_last_step(self.metrics_csv), time.monotonic()):
                print(self.line, flush=True)
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

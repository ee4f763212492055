from __future__ import annotations

import os
import signal
import time

from openpluto.jobs.isolate import run_isolated
from openpluto.slide.reader import SlideError


def _job(kind: str) -> str:
    if kind == "hang":
        time.sleep(600)  # far beyond the timeout: only the timeout can end it in time
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)  # like a reader segfault, without a core dump
    if kind == "error":
        raise SlideError("bad.svs: cannot open as a slide")
    if kind == "bug":
        raise ValueError("boom\nsecond line")
    return kind.upper()


def test_hang_crash_and_errors_do_not_stop_the_batch():
    jobs = [(k, (k,)) for k in ("ok", "hang", "crash", "error", "bug", "fine")]
    # The verdict depends on what happened, not on how fast: a job that returns at once is "ok" well
    # within 30 s on any machine, and the hanging one can only end as a "timeout".
    out = {o.key: o for o in run_isolated(_job, jobs, workers=2, timeout=30.0)}
    assert out["ok"].ok and out["ok"].value == "OK" and out["fine"].value == "FINE"
    assert out["hang"].kind == "timeout" and "timed out" in out["hang"].error
    assert out["crash"].kind == "crash" and "crashed" in out["crash"].error
    assert out["error"].kind == "error" and out["error"].error == "bad.svs: cannot open as a slide"
    assert out["bug"].kind == "error" and "ValueError: boom second line" in out["bug"].error
    assert all("\n" not in o.error for o in out.values())

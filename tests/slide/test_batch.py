from __future__ import annotations

import os
import signal
import time

from openpluto.slide.batch import run_isolated
from openpluto.slide.reader import SlideError


def _job(kind: str) -> str:
    if kind == "hang":
        time.sleep(60)
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)  # like a reader segfault, without a core dump
    if kind == "error":
        raise SlideError("bad.svs: cannot open as a slide")
    if kind == "bug":
        raise ValueError("boom\nsecond line")
    return kind.upper()


def test_hang_crash_and_errors_do_not_stop_the_batch():
    jobs = [(k, (k,)) for k in ("ok", "hang", "crash", "error", "bug", "fine")]
    t0 = time.time()
    out = {o.key: o for o in run_isolated(_job, jobs, workers=2, timeout=3.0)}
    assert time.time() - t0 < 30
    assert out["ok"].ok and out["ok"].value == "OK" and out["fine"].value == "FINE"
    assert out["hang"].kind == "timeout" and "timed out" in out["hang"].error
    assert out["crash"].kind == "crash" and "crashed" in out["crash"].error
    assert out["error"].kind == "error" and out["error"].error == "bad.svs: cannot open as a slide"
    assert out["bug"].kind == "error" and "ValueError: boom second line" in out["bug"].error
    assert all("\n" not in o.error for o in out.values())

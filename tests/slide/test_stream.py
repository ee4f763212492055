"""One reader pool for many slides: order, every tile once, and slides that hang or crash fail alone."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import pytest

from openpluto.slide import open_slide
from openpluto.slide.fastread import TileReader
from openpluto.slide.stream import ReadJob, SlideDone, SlideFailed, SlidePlanned, SlideTiles, TileStream

TILE, MPP = 32, 1.0


@dataclass
class GridPlan:
    coords: np.ndarray


def grid_plan(job: ReadJob) -> GridPlan:
    """Every tile of a regular grid over the slide (at most ``job.context`` of them)."""
    with open_slide(job.path) as s:
        step = int(round(job.tile_size * job.mpp / s.mpp))
        w, h = s.dimensions
    g = np.stack(np.meshgrid(np.arange(0, w - step, step), np.arange(0, h - step, step)), -1).reshape(-1, 2)
    return GridPlan(g[: job.context or len(g)].astype(np.int64))


def troubled_plan(job: ReadJob) -> GridPlan:
    """``grid_plan``, except that slides named hang* never finish and crash* kill their process."""
    if job.key.startswith("hang"):
        time.sleep(3600)
    if job.key.startswith("crash"):
        faulthandler.disable()  # pytest's handler would print this process's stack
        os.kill(os.getpid(), signal.SIGSEGV)
    if job.key.startswith("fifo"):  # planned without opening: the read will block on the FIFO
        return GridPlan(np.array([[0, 0], [64, 0]], np.int64))
    return grid_plan(job)


def _jobs(paths, prefix="ok", n=None):
    return [ReadJob(f"{prefix}{i}", str(p), MPP, TILE, context=n) for i, p in enumerate(paths)]


def _collect(stream: TileStream, jobs) -> list:
    """Events with their tiles copied (a SlideTiles view is only valid until the next event)."""
    out = []
    for ev in stream.stream(jobs):
        if isinstance(ev, SlideTiles):
            ev = SlideTiles(ev.job, ev.start, ev.tiles.copy())
        out.append(ev)
    return out


def _check_slides(events, jobs) -> dict[str, np.ndarray]:
    """Per slide: Planned, Tiles in order covering the plan, Done; slides in job order. -> tiles."""
    keys = [e.job.key for e in events]
    assert [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k] == [j.key for j in jobs]
    got = {}
    for job in jobs:
        evs = [e for e in events if e.job.key == job.key]
        assert isinstance(evs[0], SlidePlanned) and isinstance(evs[-1], SlideDone)
        tiles = [e for e in evs[1:-1] if isinstance(e, SlideTiles)]
        assert len(tiles) == len(evs) - 2
        assert [t.start for t in tiles] == list(np.cumsum([0] + [len(t.tiles) for t in tiles])[:-1])
        got[job.key] = np.concatenate([t.tiles for t in tiles])
        assert len(got[job.key]) == len(evs[0].plan.coords)
    return got


@pytest.mark.parametrize("workers", [2, 0])
def test_slides_stream_in_order_with_every_tile(synth_cohort, workers):
    jobs = _jobs(synth_cohort, n=50)
    with TileStream(grid_plan, TILE, workers=workers, tiles_per_read=7, queue_depth=2) as stream:
        events = _collect(stream, jobs)
        tiles = _check_slides(events, jobs)
        again = _check_slides(_collect(stream, jobs[:1]), jobs[:1])  # the same pool serves a second stream
    np.testing.assert_array_equal(again["ok0"], tiles["ok0"])
    for job in jobs:
        plan = next(e.plan for e in events if isinstance(e, SlidePlanned) and e.job.key == job.key)
        with TileReader(job.path, MPP, TILE) as r:
            np.testing.assert_array_equal(tiles[job.key], r.read(plan.coords))
    assert stream.stats.reader.tiles == sum(len(t) for t in tiles.values()) + len(again["ok0"])


def test_hung_crashed_and_bad_slides_fail_alone(synth_cohort, tmp_path):
    fifo = tmp_path / "fifo.svs"
    os.mkfifo(fifo)  # opening it for reading blocks forever: a reader that hangs inside C code
    ok = _jobs(synth_cohort, n=30)
    jobs = [ok[0], ReadJob("hang", str(synth_cohort[1]), MPP, TILE), ok[1],
            ReadJob("crash", str(synth_cohort[2]), MPP, TILE), ReadJob("fifo", str(fifo), MPP, TILE),
            ReadJob("missing", str(tmp_path / "missing.svs"), MPP, TILE), ok[2]]
    with TileStream(troubled_plan, TILE, workers=2, timeout=30.0, tiles_per_read=8) as stream:
        events = _collect(stream, jobs)
    failed = {e.job.key: e for e in events if isinstance(e, SlideFailed)}
    assert {k: e.kind for k, e in failed.items()} == {"hang": "timeout", "crash": "crash", "fifo": "timeout",
                                                      "missing": "error"}
    for e in failed.values():
        assert e.job.path in e.error and "\n" not in e.error
    assert "planning" in failed["hang"].error and "reading" in failed["fifo"].error
    assert "crashed" in failed["crash"].error
    assert not any(e.job.key in failed for e in events if not isinstance(e, SlideFailed | SlidePlanned))
    _check_slides([e for e in events if e.job.key not in failed], ok)


def write_marker(path: str, fail: bool) -> None:
    if fail:
        raise ValueError("no picture today")
    with open(path, "w") as f:
        f.write("done")


@pytest.mark.parametrize("workers", [1, 0])
def test_side_jobs_finish_before_the_stream_ends(synth_cohort, tmp_path, workers):
    jobs = _jobs(synth_cohort[:2], n=5)
    with TileStream(grid_plan, TILE, workers=workers) as stream:
        for ev in stream.stream(jobs):
            if isinstance(ev, SlideDone):
                stream.post(write_marker, str(tmp_path / f"{ev.job.key}.txt"), ev.job.key == "ok1")
        assert (tmp_path / "ok0.txt").read_text() == "done" and not (tmp_path / "ok1.txt").exists()
        assert len(stream.side_errors) == 1 and "write_marker" in stream.side_errors[0]
        assert "no picture today" in stream.side_errors[0]


def test_readers_exit_when_the_main_process_dies(synth_cohort, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "main.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_stream import _jobs, grid_plan\n"
        "from openpluto.slide.stream import TileStream\n"
        "with TileStream(grid_plan, 32, workers=3) as s:\n"
        f"    for ev in s.stream(_jobs({[str(p) for p in synth_cohort]!r})):\n"
        "        print(' '.join(str(w.proc.pid) for w in s._pool), flush=True)\n"
        "        time.sleep(3600)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 3
    proc.kill()  # SIGKILL: no clean-up code runs in the main process
    proc.wait()

    def running(pid: int) -> bool:  # an exited process not yet reaped by its new parent is a zombie
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.1)
    assert not any(running(p) for p in pids)

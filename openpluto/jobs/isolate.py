"""Run one job per slide in its own worker process, with a timeout (used by tissue, tiles and embed).

A slide whose C reader hangs or crashes (segfault) only loses that slide: the worker is killed or
found dead, the failure is reported, and the batch goes on.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from openpluto.errors import OpenPlutoError, exception_line


@dataclasses.dataclass
class Outcome:
    """Result of one job: ``ok`` with ``value``, or ``error`` (one line) and ``kind``."""

    key: str
    ok: bool
    value: Any = None
    error: str = ""
    kind: str = ""  # "", "error", "timeout", "crash"
    seconds: float = 0.0


def _child(conn, fn: Callable, args: tuple) -> None:
    try:
        value = fn(*args)
        conn.send(("ok", value))
    except OpenPlutoError as e:
        conn.send(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - report anything, one line
        conn.send(("error", exception_line(e)))
    finally:
        conn.close()


def _crashed(key: str, exitcode: int | None, seconds: float) -> Outcome:
    """The Outcome of a worker process that died without sending a result."""
    return Outcome(key, False, error=f"worker crashed (exit code {exitcode})", kind="crash", seconds=seconds)


def _context(start_method: str | None):
    methods = mp.get_all_start_methods()
    if start_method is None:
        start_method = "fork" if "fork" in methods else "spawn"
    return mp.get_context(start_method if start_method in methods else "spawn")


def run_isolated(
    fn: Callable,
    jobs: Iterable[tuple[str, tuple]],
    workers: int = 1,
    timeout: float = 600.0,
    poll: float = 0.02,
    start_method: str | None = None,
) -> Iterator[Outcome]:
    """Run ``fn(*args)`` for each ``(key, args)`` in a separate process; yield Outcomes as they finish.

    At most ``workers`` processes run at once; a job running longer than ``timeout`` seconds is
    killed (``kind="timeout"``); a process that dies without answering is ``kind="crash"``.
    ``start_method`` is a multiprocessing start method (default ``fork`` where available; use
    ``forkserver`` from a process that runs other threads, e.g. a model).
    """
    ctx = _context(start_method)
    pending = list(jobs)
    running: dict[str, tuple[Any, Any, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < max(1, workers):
                key, args = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
                p.start()
                send.close()
                running[key] = (p, recv, time.monotonic())
            done = []
            for key, (p, recv, t0) in running.items():
                elapsed = time.monotonic() - t0
                out = None
                if recv.poll():
                    try:
                        status, value = recv.recv()
                        out = (
                            Outcome(key, True, value=value, seconds=elapsed)
                            if status == "ok"
                            else Outcome(key, False, error=value, kind="error", seconds=elapsed)
                        )
                    except (EOFError, OSError):
                        out = None
                    if out is None:
                        p.join(5)
                        out = _crashed(key, p.exitcode, elapsed)
                    p.join(10)
                    if p.is_alive():
                        p.kill()
                        p.join()
                elif not p.is_alive():
                    out = _crashed(key, p.exitcode, elapsed)
                elif elapsed > timeout:
                    p.kill()
                    p.join()
                    out = Outcome(
                        key,
                        False,
                        error=f"timed out after {timeout:g} s (reader hung? raise --timeout for a big slide)",
                        kind="timeout",
                        seconds=elapsed,
                    )
                if out is not None:
                    recv.close()
                    done.append(key)
                    yield out
            for key in done:
                running.pop(key)
            if running and not done:
                time.sleep(poll)
    finally:
        for p, recv, _ in running.values():
            if p.is_alive():
                p.kill()
                p.join()
            recv.close()

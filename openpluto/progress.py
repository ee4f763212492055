"""Progress reporting: a tqdm bar on a terminal, plain periodic lines in logs.

``progress(...)`` takes tqdm's common arguments (``iterable``, ``total``, ``desc``, ``unit``,
``initial``, ``leave``, ``disable``, ...) and returns a tqdm bar when stderr is a terminal. When it is
not (a log file, a pipe, a batch job), it returns a ``PlainProgress`` that writes whole lines instead of
carriage-return redraws::

    pretrain: 40/400 steps (10%), 1.31 s/step, about 7.9 min left

A line is written each time another tenth of ``total`` is done (bars with ``leave=True`` only),
at least every ``interval_s`` seconds while work goes on (so a long job shows it is alive), and once
at the end. ``OPENPLUTO_PROGRESS=bar|plain|off`` overrides the choice.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

PLAIN_INTERVAL_S = 60.0


def _mode(file: TextIO) -> str:
    forced = os.environ.get("OPENPLUTO_PROGRESS", "").strip().lower()
    if forced in ("bar", "plain", "off"):
        return forced
    isatty = getattr(file, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "plain"


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, leave: bool = True, disable: bool = False,
             file: TextIO | None = None, interval_s: float = PLAIN_INTERVAL_S, **tqdm_kwargs: Any):
    """A progress bar on a terminal, else plain periodic lines (see the module docstring).

    Extra keyword arguments (``position``, ``dynamic_ncols``, ``mininterval``...) go to tqdm only.
    """
    stream = file if file is not None else sys.stderr
    mode = "off" if disable else _mode(stream)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=file,
                    **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                         quiet=mode == "off", file=stream, interval_s=interval_s)


def write(message: str, file: TextIO | None = None) -> None:
    """Print a line without breaking a tqdm bar on a terminal (``tqdm.write`` elsewhere: ``print``)."""
    stream = file if file is not None else sys.stderr
    if _mode(stream) == "bar":
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class PlainProgress:
    """tqdm's ``update``/``set_postfix``/``close``/iteration, written as whole log lines."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, quiet: bool = False,
                 file: TextIO | None = None, interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.leave, self.quiet, self.file, self.interval_s = leave, quiet, file, interval_s
        self.postfix: dict[str, Any] = {}
        self.lines: list[str] = []  # what was written, for tests and callers that log it elsewhere
        self._t0 = self._last = time.monotonic()
        self._tenth = self._tenths(initial)
        self._closed = False

    def _tenths(self, n: float) -> int:
        return int(10 * n // self.total) if self.total else 0

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("PlainProgress without an iterable cannot be iterated")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        pass

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        tenth = self._tenths(self.n)
        if (self.leave and tenth > self._tenth) or now - self._last >= self.interval_s:
            self._emit(now)
        self._tenth = tenth

    def format_line(self, now: float | None = None) -> str:
        """``desc: n/total unit (p%), rate, time left, postfix``."""
        now = time.monotonic() if now is None else now
        done = self.n - self.start_n
        elapsed = max(now - self._t0, 1e-9)
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        parts = [f"{count} {self.unit}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if done > 0:
            per = elapsed / done
            parts.append(f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"about {_duration(per * (self.total - self.n))} left")
            elif self.total:
                parts.append(f"took {_duration(elapsed)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _emit(self, now: float | None = None) -> None:
        self._last = time.monotonic() if now is None else now
        if self.quiet:
            return
        line = self.format_line(now)
        self.lines.append(line)
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave and self.n > self.start_n and (not self.lines or self._tenth < 10):
            self._emit()

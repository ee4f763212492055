"""The loop every slide stage shares: decide what is left to do, run each slide isolated, report."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from openpluto.errors import ConfigError
from openpluto.jobs.cohort import Cohort, SlideJob, SlideRef, done_state
from openpluto.jobs.outputs import error_row, other_settings_message, slide_message
from openpluto.jobs.slides import slide_identity


@dataclasses.dataclass
class Todo:
    """This shard's slides still to do (``ref``, identity, settings) and the ids already done."""

    slides: list[tuple[SlideRef, dict, dict]]
    already: list[str]
    notes: list[str]

    def jobs(self, override_key: str = "mpp_override") -> list[SlideJob]:
        """One :class:`SlideJob` per slide to do (its override is ``settings[override_key]``)."""
        return [SlideJob(r.id, str(r.path), ident, s, s.get(override_key)) for r, ident, s in self.slides]


def plan_todo(
    cohort: Cohort,
    record_of: Callable[[str], tuple[Path, Mapping[str, Any] | None]],
    settings_of: Callable[[SlideRef], dict],
    overwrite: bool,
    verb: str,
) -> Todo:
    """Compare each slide of this shard with its existing output (``record_of(id)`` -> (file, record)).

    Raises a one-line ``ConfigError`` when an output was made with other settings (unless
    ``overwrite``), before anything is written; a slide file that changed since is redone with a note.
    """
    todo = Todo([], [], [])
    for ref in cohort.mine:
        identity, settings = slide_identity(ref.path), settings_of(ref)
        where, record = record_of(ref.id)
        state, diff = done_state(record, identity, settings)
        if state == "done" and not overwrite:
            todo.already.append(ref.id)
            continue
        if state == "settings" and not overwrite:
            raise ConfigError(other_settings_message(where, diff))
        if state == "changed":
            todo.notes.append(f"notice: {ref.path} changed since it was {verb}; doing it again")
        todo.slides.append((ref, identity, settings))
    return todo


def stderr_writer(progress: bool) -> Callable[[str], None]:
    """A line printer to stderr that does not break a progress bar on a terminal."""
    from openpluto.progress import write

    def say(line: str) -> None:
        if progress:
            write(line)
        else:
            print(line, file=sys.stderr)

    return say


def run_slides(
    stage: str,
    fn: Callable,
    jobs: list[tuple[str, tuple]],
    paths: Mapping[str, Path],
    workers: int,
    timeout: float,
    progress: bool,
    say: Callable[[str], None],
    on_fail: Callable[[str], None] | None = None,
    preload: Sequence[str] = (),
) -> tuple[dict[str, Any], list[dict]]:
    """Run ``fn(*args)`` per ``(id, args)`` in isolated workers with ``timeout``.

    Returns (id -> value of the slides that succeeded, errors.csv rows of those that failed); every
    failure is printed as one ``error: <path>: <message>`` line, and ``on_fail(id)`` cleans up.
    ``preload`` names modules ``fn`` imports: they are imported here, once, so that each forked slide
    process inherits them instead of importing them again (scipy, skimage, webdataset -> torch: ~1.3 s
    and ~530 MiB of private memory per slide process otherwise, README `openpluto tiles`). A module
    that does not import is left to the worker, which reports it per slide.
    """
    from openpluto.jobs.isolate import run_isolated
    from openpluto.progress import progress as progress_bar

    for name in preload:
        with contextlib.suppress(ImportError, OSError):  # no OpenSlide library: slides that need it say so
            importlib.import_module(name)

    values: dict[str, Any] = {}
    errors: list[dict] = []
    bar = progress_bar(total=len(jobs), desc=stage, unit="slide", disable=not progress or not jobs)
    for o in run_isolated(fn, jobs, workers=workers, timeout=timeout):
        if o.ok:
            values[o.key] = o.value
        else:
            line = slide_message(paths[o.key], o.error)
            errors.append(error_row(o.key, paths[o.key], stage, o.kind, line))
            if on_fail is not None:
                on_fail(o.key)
            say(f"error: {line}")
        bar.update(1)
    bar.close()
    return values, errors

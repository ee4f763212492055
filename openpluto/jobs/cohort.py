"""The slides of one stage run: discovered, named, split into shards, and checked against ``--out``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from openpluto.jobs.outputs import error_row, settings_diff
from openpluto.jobs.shard import Shard
from openpluto.jobs.slides import Skipped, assign_ids, discover_slides, same_slide


@dataclasses.dataclass(frozen=True)
class SlideRef:
    """One slide of the run: its unique ``id`` (output names) and ``path`` (as given)."""

    id: str
    path: Path


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """What a worker needs to know about its slide: id, path, identity, the settings to record and
    its µm/px override (picklable)."""

    slide_id: str
    path: str
    identity: dict
    settings: dict
    mpp_override: float | None = None

    def record(self) -> dict:
        """The fields every per-slide output record starts with."""
        from openpluto.jobs.outputs import settings_fingerprint

        return {"slide": self.slide_id, "slide_id": self.slide_id, "path": self.path,
                "identity": self.identity, "settings": self.settings,
                "settings_fingerprint": settings_fingerprint(self.settings)}


@dataclasses.dataclass
class Cohort:
    """All slides of the run (``slides``), this shard's share (``mine``) and the skipped entries."""

    slides: list[SlideRef]
    mine: list[SlideRef]
    skipped: list[Skipped]
    shard: Shard

    def skipped_rows(self, stage: str, failed_only: bool = False) -> list[dict]:
        """errors.csv rows of the skipped entries (reported by shard 0 only, so parts do not repeat them)."""
        if self.shard.index != 0:
            return []
        return [
            error_row("", s.path, stage, "skipped", s.reason)
            for s in self.skipped
            if s.failed or not failed_only
        ]

    @property
    def skipped_failures(self) -> int:
        return sum(s.failed for s in self.skipped) if self.shard.index == 0 else 0


def build_cohort(
    inputs: Sequence[str | os.PathLike],
    shard: Shard,
    owner_of: Callable[[str], str | None] | None = None,
    recursive: bool = True,
) -> Cohort:
    """Discover the slides of ``inputs``, give each a unique id and pick this shard's share.

    The split balances shards by file size; it depends only on the slides found, so every shard
    makes the same one.
    """
    found = discover_slides(inputs, recursive=recursive)
    ids = assign_ids(found.paths, owner_of)
    refs = [SlideRef(i, p) for i, p in zip(ids, found.paths)]
    sizes = [_size(p) for p in found.paths]
    return Cohort(refs, shard.select(refs, weights=sizes), found.skipped, shard)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def recorded_owner(record: Mapping[str, Any] | None) -> str | None:
    """Resolved slide path an output record belongs to (older records: their ``path`` resolved)."""
    if not record:
        return None
    ident = record.get("identity") or {}
    if ident.get("resolved"):
        return str(ident["resolved"])
    path = record.get("path") or record.get("slide_path")
    return str(Path(str(path)).resolve()) if path else None


def done_state(
    record: Mapping[str, Any] | None, identity: Mapping[str, Any], settings: Mapping[str, Any]
) -> tuple[str, str]:
    """Whether an existing output is this slide done with these settings.

    Returns ``("todo", "")`` (no output), ``("settings", diff)`` (made with other settings: refuse
    unless --overwrite), ``("changed", "")`` (the slide file changed since: redo) or ``("done", "")``.
    """
    if record is None:
        return "todo", ""
    diff = settings_diff(record.get("settings"), settings)
    if diff:
        return "settings", diff
    if not same_slide(record.get("identity"), dict(identity)):
        return "changed", ""
    return "done", ""

"""What every slide-stage output records, and the one ``errors.csv``.

- Settings: each per-slide output stores the settings that shaped it (``settings``) and their
  fingerprint (``settings_fingerprint``, 16 hex of sha256 over the sorted JSON). A rerun with other
  settings is refused with one line naming what differs, unless ``--overwrite``.
- "Already done" means the same slide file (resolved path, size, mtime) *and* the same settings.
- ``errors.csv`` (one layout for tissue, tiles, embed and embed-images): ``slide_id, path, stage,
  kind, error``; kind is ``error``, ``timeout``, ``crash``, ``settings``, ``skipped`` or ``warning``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from openpluto.io import atomic_path

ERROR_COLUMNS = ("slide_id", "path", "stage", "kind", "error")
# kinds that are reported but are not a failed slide
NOT_FAILURES = ("warning", "skipped")


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """16 hex characters identifying ``settings`` (order of keys does not matter)."""
    blob = json.dumps(_plain(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(v: Any) -> Any:
    """JSON-comparable form: tuples -> lists, floats rounded to 9 significant digits."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float):
        return float(f"{v:.9g}") if math.isfinite(v) else str(v)
    if hasattr(v, "item"):  # numpy scalars (h5 attributes)
        return _plain(v.item())
    if isinstance(v, bytes):
        return v.decode()
    return v


def settings_diff(recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> str:
    """``"tile_size [128] != [256], mpp ..."`` for keys whose values differ ('' when the same)."""
    recorded = _plain(dict(recorded or {}))
    wanted = _plain(dict(wanted))
    diffs = []
    for k in sorted(set(recorded) | set(wanted)):
        have, want = recorded.get(k, "(none)"), wanted.get(k, "(none)")
        if have != want:
            diffs.append(f"{k} {have} != {want}")
    return ", ".join(diffs)


def other_settings_message(output: str | os.PathLike, diff: str) -> str:
    """The one-line refusal for an output made with other settings."""
    return (
        f"{output} was made with other settings ({diff}); pass --overwrite to redo it, or use another --out"
    )


def error_row(slide_id: str, path: str | os.PathLike, stage: str, kind: str, error: str) -> dict:
    return {"slide_id": slide_id, "path": str(path), "stage": stage, "kind": kind, "error": one_line(error)}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def slide_message(path: str | os.PathLike, error: str) -> str:
    """``<path>: <error>``, without repeating the path or file name when the error starts with it."""
    error = one_line(error)
    p = Path(path)
    for prefix in (str(p), p.name):
        if error.startswith(prefix + ":") or error.startswith(prefix + " "):
            error = error[len(prefix) :].lstrip(": ")
            break
    return f"{path}: {error}"


def write_errors_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """``errors.csv`` (header only when nothing went wrong), written atomically."""
    rows = sorted(rows, key=lambda r: (str(r.get("path", "")), str(r.get("kind", ""))))
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ERROR_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in ERROR_COLUMNS})


def read_errors_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def part_name(name: str, index: int | str, count: int) -> str:
    """``manifest.csv`` for one process, ``manifest.part-0-of-2.csv`` for shard 0 of 2 (index ``"*"``:
    the pattern of all parts)."""
    if count <= 1:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}.part-{index}-of-{count}{dot}{ext}"


def shard_part(name: str, label: str) -> str:
    """``part_name`` of the shard a summary labels ``"I/N"``: the file that shard wrote."""
    index, count = (int(v) for v in label.split("/"))
    return part_name(name, index, count)


def part_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """``name`` and every shard part of it in ``folder`` (what a reader takes the union of)."""
    folder = Path(folder)
    stem, dot, ext = name.partition(".")
    found = [folder / name] if (folder / name).is_file() else []
    found += sorted(p for p in folder.glob(f"{stem}.part-*-of-*{dot}{ext}") if p.is_file())
    return found


def read_csv_union(folder: str | os.PathLike, name: str, key: str) -> list[dict]:
    """Rows of ``name`` and all its shard parts in ``folder``, each ``key`` once (first seen wins)."""
    rows: list[dict] = []
    seen: set[str] = set()
    for p in part_files(folder, name):
        with open(p, newline="") as f:
            for r in csv.DictReader(f):
                if r.get(key) not in seen:
                    seen.add(r.get(key))
                    rows.append(r)
    return rows

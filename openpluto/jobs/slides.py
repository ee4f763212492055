"""Which slides a stage works on and what each one is called.

- ``SLIDE_EXTENSIONS``: the one list of whole-slide file extensions (OpenSlide's formats, DICOM,
  QPTIFF and BigTIFF).
- ``discover_slides``: slide files from files and folders; every entry that looks like a slide but
  cannot be used (a dangling link, a folder named ``x.svs``, an unreadable file) and every hidden
  slide-like file is reported, never dropped in silence.
- ``assign_ids``: a stable, unique, readable id per slide (the file stem, plus a short hash of the
  resolved path when stems collide in the run or with what is already in the output folder).
- ``slide_identity``: resolved path, size and mtime, which tell whether an output is of this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from openpluto.errors import OpenPlutoError

SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".qptiff",
    ".btf",
)


# Longest readable stem in UTF-8 bytes: ``<id>_m0500_s550_x123456_y123456.json`` must fit in 100 bytes.
MAX_STEM_BYTES = 48


class InputError(OpenPlutoError):
    """Slide inputs that cannot be used at all (a missing path, a folder without slides)."""


def looks_like_slide(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_EXTENSIONS


@dataclasses.dataclass
class Skipped:
    """An entry that looks like a slide but is not used: ``path`` and a one-line ``reason``.

    ``failed`` entries (a dangling link, a folder, an unreadable file) count as failed slides;
    hidden files (``.x.svs``, macOS ``._x.svs``) are only reported.
    """

    path: Path
    reason: str
    failed: bool = True

    def line(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclasses.dataclass
class Discovery:
    """Slide files in input order (unique by resolved path) and the entries skipped."""

    paths: list[Path]
    skipped: list[Skipped]


def _unusable(p: Path) -> str | None:
    """Why ``p`` (named like a slide) cannot be a slide file, or None if it can."""
    if p.is_symlink() and not p.exists():
        return f"dangling link to {os.readlink(p)}; fix or remove the link"
    if p.is_dir():
        return "is a folder, not a slide file; rename it or pass the slide files inside"
    if not p.is_file():
        return "is not a regular file"
    if not os.access(p, os.R_OK):
        return "cannot be read (permission denied); fix its permissions"
    return None


def _scan_folder(folder: Path, recursive: bool, skipped: list[Skipped]) -> list[Path]:
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    found = []
    for q in entries:
        if not looks_like_slide(q):
            continue
        if q.name.startswith("."):
            skipped.append(Skipped(q, "hidden file, not used as a slide", failed=False))
            continue
        why = _unusable(q)
        if why:
            skipped.append(Skipped(q, why))
        else:
            found.append(q)
    return found


def discover_slides(inputs: Sequence[str | os.PathLike], recursive: bool = True) -> Discovery:
    """Slide files from ``inputs`` (files, or folders searched for ``SLIDE_EXTENSIONS``).

    A file named explicitly is used whatever its extension. Raises ``InputError`` (one line) for a
    path that does not exist or a folder with no slide file, so a stage fails before writing.
    """
    if not inputs:
        raise InputError("no slides given (pass slide files or folders)")
    found: list[Path] = []
    skipped: list[Skipped] = []
    for item in inputs:
        p = Path(item)
        if p.is_symlink() and not p.exists():
            skipped.append(Skipped(p, f"dangling link to {os.readlink(p)}; fix or remove the link"))
        elif p.is_dir():
            before = len(skipped)
            files = _scan_folder(p, recursive, skipped)
            if not files and len(skipped) == before:
                deep = "" if recursive else " (pass --recursive to search sub-folders)"
                raise InputError(f"{p}: no slide files ({' '.join(SLIDE_EXTENSIONS)}) in this folder{deep}")
            found.extend(files)
        elif p.exists():
            why = _unusable(p)
            if why:
                skipped.append(Skipped(p, why))
            else:
                found.append(p)
        else:
            raise InputError(f"{p}: no such slide file or folder")
    seen: set[Path] = set()
    unique = []
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return Discovery(unique, skipped)


# ----------------------------------------------------------------------------- ids


def readable_stem(path: str | os.PathLike) -> str:
    """File stem kept readable and safe as a file name and WebDataset key.

    Letters and digits of any script are kept (``日本 slide.tiff`` -> ``日本_slide``); every other run
    of characters (spaces, dots, punctuation) becomes one ``_``.
    """
    stem = unicodedata.normalize("NFC", Path(path).stem)
    out, gap = [], False
    for ch in stem:
        if ch.isalnum() or ch in "-_":
            out.append(ch)
            gap = False
        elif not gap:
            out.append("_")
            gap = True
    name = "".join(out).strip("_")
    while len(name.encode()) > MAX_STEM_BYTES:  # keeps tar member names within USTAR's 100 bytes
        name = name[:-1]
    return name or "slide"


def path_hash(path: str | os.PathLike, n: int = 8) -> str:
    """Short hex hash of the resolved path (what tells two same-named slides apart)."""
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:n]


def assign_ids(paths: Sequence[Path], owner_of: Callable[[str], str | None] | None = None) -> list[str]:
    """A unique id per slide: its readable stem, or ``<stem>_<hash8>`` when that stem is taken.

    A stem is taken when another slide of ``paths`` has it, or when ``owner_of(id)`` (the resolved
    path of an output already in the output folder under that id, or None) names another file.
    A slide keeps the id its existing output has, so ids are stable across runs into one folder.
    The ids depend only on ``paths`` and the output folder, so every shard computes the same ones.
    """
    owner_of = owner_of or (lambda _id: None)
    stems = [readable_stem(p) for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    ids = []
    for p, stem in zip(paths, stems):
        resolved = str(p.resolve())
        hashed = f"{stem}_{path_hash(p)}"
        owner = owner_of(stem)
        if owner == resolved:
            ids.append(stem)
        elif owner_of(hashed) is not None or counts[stem] > 1 or owner is not None:
            ids.append(hashed)
        else:
            ids.append(stem)
    return ids


def slide_identity(path: str | os.PathLike) -> dict:
    """``{"resolved": str, "size": bytes, "mtime_ns": int}``: recorded in outputs to recognise the file."""
    p = Path(path)
    st = p.stat()
    return {"resolved": str(p.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def same_slide(recorded: dict | None, current: dict) -> bool:
    """True if an output's recorded identity is that of the slide file as it is now."""
    if not recorded:
        return False
    return all(recorded.get(k) == current[k] for k in ("resolved", "size", "mtime_ns"))


def report_skipped(skipped: Iterable[Skipped], write: Callable[[str], None]) -> None:
    """One ``notice:`` line per skipped entry."""
    for s in skipped:
        write(f"notice: skipped {s.line()}")

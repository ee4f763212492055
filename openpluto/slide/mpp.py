"""µm/px overrides for slides whose metadata has none: one value for all, or a CSV ``slide,mpp``."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from openpluto.slide.reader import SlideError


def _positive(value: str, where: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise SlideError(f"{where}: µm/px must be a number, got {value!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise SlideError(f"{where}: µm/px must be positive, got {value!r}")
    return f


class MppOverrides:
    """``--mpp-override``: a number applied to every slide, or a CSV with columns ``slide,mpp``.

    In the CSV, ``slide`` is a file name, a stem or a path; lookups try all three.
    """

    def __init__(self, value: float | None = None, table: dict[str, float] | None = None):
        self.value = value
        self.table = dict(table or {})

    @classmethod
    def parse(cls, spec: str | float | None) -> MppOverrides:
        if spec is None or (isinstance(spec, str) and not spec.strip()):
            return cls()
        if isinstance(spec, (int, float)):
            return cls(value=_positive(str(spec), "--mpp-override"))
        spec = str(spec).strip()
        try:
            return cls(value=_positive(spec, "--mpp-override"))
        except SlideError:
            pass
        path = Path(spec)
        if not path.is_file():
            raise SlideError(
                f"--mpp-override {spec!r} is neither a number nor an existing CSV file (slide,mpp)"
            )
        table: dict[str, float] = {}
        with open(path, newline="") as f:
            reader = csv.reader(f)
            for i, row in enumerate(reader, start=1):
                if not row or not "".join(row).strip() or row[0].strip().startswith("#"):
                    continue
                if len(row) < 2:
                    raise SlideError(f"{path}: line {i} must be 'slide,mpp', got {','.join(row)!r}")
                name, val = row[0].strip(), row[1].strip()
                if i == 1 and name.lower() in ("slide", "name", "path", "file"):
                    continue  # header
                table[name] = _positive(val, f"{path} line {i}")
        return cls(table=table)

    def get(self, slide_path: str | os.PathLike) -> float | None:
        p = Path(slide_path)
        for key in (str(p), p.name, p.stem):
            if key in self.table:
                return self.table[key]
        return self.value

    def __bool__(self) -> bool:
        return self.value is not None or bool(self.table)


def resolve_mpp(path: str | os.PathLike, override: str | float | None) -> float | None:
    """The override µm/px for ``path`` from a number or CSV spec (None when none applies)."""
    return MppOverrides.parse(override).get(path)

"""The cohort side of ``openpluto embed``: which slides, their ids, what is already done, errors, parts.

Built on :mod:`openpluto.jobs`: slides are discovered with the one extension list (skipped entries
reported), named by their unique id (``<id>.h5``), split by ``--shard I/N`` (and torchrun ranks), and
a finished ``<id>.h5`` counts as done only for the same slide file and the same settings (attributes
``slide_id``, ``slide_identity``, ``settings``, ``settings_fingerprint``); other settings are refused
unless ``--overwrite``. Each process writes ``errors.csv`` and ``summary.json`` (or their
``.part-I-of-N`` parts).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from openpluto.embed.config import EmbedConfig
from openpluto.io import write_json_atomic
from openpluto.jobs.cohort import Cohort, build_cohort, recorded_owner
from openpluto.jobs.outputs import part_name, write_errors_csv
from openpluto.jobs.runner import Todo, plan_todo
from openpluto.jobs.shard import Shard

# EmbedConfig fields that change the features (the others change how the run goes).
SETTING_FIELDS = (
    "mpp", "tile_size", "pooling", "min_tissue", "max_tiles", "allow_upsample", "save_patch_tokens"
)


@dataclass
class EmbedSummary:
    """Counts of one process (``merge`` adds other ranks'); ``errors`` are errors.csv rows."""

    slides: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    tiles: int = 0
    seconds: float = 0.0
    errors: list[dict] = field(default_factory=list)

    def merge(self, other: EmbedSummary) -> None:
        self.slides += other.slides
        self.embedded += other.embedded
        self.skipped += other.skipped
        self.failed += other.failed
        self.tiles += other.tiles
        self.seconds = max(self.seconds, other.seconds)
        self.errors.extend(other.errors)

    def line(self) -> str:
        rate = self.tiles / self.seconds if self.seconds > 0 else 0.0
        return (
            f"embedded {self.embedded} slide(s), {self.tiles} tiles in {self.seconds:.1f} s "
            f"({rate:.1f} tiles/s); skipped {self.skipped} already done; {self.failed} failed"
        )


def embed_settings(cfg: EmbedConfig, encoder: Any, patch_size: int, mpp_override: float | None) -> dict:
    """What shapes a slide's features: the tile grid, the model and its patch size, the µm/px override."""
    s = {k: getattr(cfg, k) for k in SETTING_FIELDS}
    return {**s, "patch_size": int(patch_size), "model": str(encoder.name),
            "weights_hash": str(encoder.weights_hash), "mpp_override": mpp_override}


def read_record(path: Path) -> dict | None:
    """A finished ``<id>.h5``'s record (settings, identity, slide path), None if absent or incomplete."""
    import h5py

    from openpluto.embed.writer import is_complete

    if not is_complete(path):
        return None
    with h5py.File(path, "r") as f:
        a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return {
        "path": str(a.get("slide_path", "")),
        "settings": json.loads(a["settings"]) if "settings" in a else None,
        "identity": json.loads(a["slide_identity"]) if "slide_identity" in a else None,
    }


def select_slides(cfg: EmbedConfig, out_dir: Path) -> Cohort:
    """All slides of ``cfg.inputs`` with their ids, and this process's share (``--shard``, torchrun rank)."""
    owner = lambda i: recorded_owner(read_record(out_dir / f"{i}.h5"))  # noqa: E731
    return build_cohort(list(cfg.inputs), Shard.parse(cfg.shard), owner, recursive=cfg.recursive)


def todo_slides(cohort: Cohort, cfg: EmbedConfig, out_dir: Path, encoder: Any, patch_size: int,
                overrides: Any) -> Todo:
    """This process's slides still to embed; refuses outputs made with other settings (one line)."""

    def record_of(slide_id: str) -> tuple[Path, dict | None]:
        return out_dir / f"{slide_id}.h5", read_record(out_dir / f"{slide_id}.h5")

    settings_of = lambda r: embed_settings(cfg, encoder, patch_size, overrides.get(r.path))  # noqa: E731
    return plan_todo(cohort, record_of, settings_of, cfg.overwrite, "embedded")


def record_attrs(slide_id: str, identity: dict, settings: dict) -> dict[str, Any]:
    """The h5 attributes that make a slide file recognisable on rerun."""
    from openpluto.jobs.outputs import settings_fingerprint

    return {"slide_id": slide_id, "slide_identity": json.dumps(identity), "settings": json.dumps(settings),
            "settings_fingerprint": settings_fingerprint(settings)}


def write_parts(out_dir: Path, shard: Shard, summary: EmbedSummary) -> None:
    """This process's ``errors.csv`` and ``summary.json`` (``.part-I-of-N`` with several shards)."""
    write_errors_csv(out_dir / part_name("errors.csv", shard.index, shard.count), summary.errors)
    body = {k: v for k, v in asdict(summary).items() if k != "errors"}
    write_json_atomic(out_dir / part_name("summary.json", shard.index, shard.count),
                      {**body, "shard": shard.label, "seconds": round(summary.seconds, 2)})

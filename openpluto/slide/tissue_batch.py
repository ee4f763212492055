"""``openpluto tissue``: masks, GeoJSON and QC overlays for a batch of slides (one worker process each).

Per slide ``<id>_mask.png``, ``<id>_overlay.png``, ``<id>.geojson`` and ``<id>.json`` (the record:
slide id, identity, settings and fingerprint, areas), written last; a rerun skips slides whose record
matches. Per run (or per ``--shard I/N`` part): ``errors.csv`` and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from openpluto.config import from_dict, to_dict
from openpluto.io import write_json_atomic
from openpluto.jobs.outputs import part_name
from openpluto.slide.config import TissueConfig

# What tissue_one imports (lazily): run_tissue imports them once before it forks the slide processes.
TISSUE_ONE_MODULES = ("openslide", "tifffile", "openpluto.slide.geojson", "openpluto.slide.qc",
                      "openpluto.slide.tissue", "openpluto.slide.reader")


def tissue_one(job, out: str, tissue_dict: dict) -> dict:
    """Write ``<id>_mask.png``, ``_overlay.png``, ``.geojson`` and ``.json`` of one slide (a
    :class:`openpluto.jobs.cohort.SlideJob`) into ``out``."""
    from openpluto.slide import geojson, qc
    from openpluto.slide.reader import open_slide
    from openpluto.slide.tissue import detect_tissue

    t0 = time.time()
    slide_id = job.slide_id
    cfg = from_dict(TissueConfig, tissue_dict)
    out_p = Path(out)
    (out_p / f"{slide_id}.json").unlink(missing_ok=True)
    with open_slide(job.path, mpp_override=job.mpp_override, require_mpp=False) as slide:
        r = detect_tissue(slide, cfg)
        mpp_txt = f"{slide.mpp:.4g} um/px" if slide.mpp else "no mpp"
        qc.save_overlay(out_p / f"{slide_id}_overlay.png", r, title=f"{slide_id}  ({mpp_txt})")
        qc.save_mask(out_p / f"{slide_id}_mask.png", r)
        masks = {"tissue": r.tissue, **{k: v for k, v in r.artifacts.items() if v.any()}}
        geojson.write_geojson(out_p / f"{slide_id}.geojson", masks, r.downsample, slide_id)
        info = {
            **job.record(),
            "mpp": slide.mpp,
            "downsample": r.downsample,
            "mask_shape": list(r.tissue.shape),
            "dark_background": r.dark_background,
            "modality": r.modality,
            "stain": r.stain,
            "dab_fraction": r.dab_fraction,
            "tissue_fraction": float(r.tissue.mean()),
            "usable_fraction": float(r.usable.mean()),
            "tissue_mm2": r.area_mm2(),
            "usable_mm2": r.area_mm2(r.usable),
            "artifact_fraction": {k: float(v.mean()) for k, v in r.artifacts.items()},
            "seconds": round(time.time() - t0, 3),
        }
    write_json_atomic(out_p / f"{slide_id}.json", info)
    return info


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_tissue(
    inputs: Sequence[str],
    out: str | Path,
    cfg: TissueConfig | None = None,
    mpp_override: str | None = None,
    workers: int = 1,
    timeout: float = 600.0,
    progress: bool = True,
    shard: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Tissue masks for this shard's slides; writes ``errors.csv`` / ``summary.json`` (or their parts).

    Returns the summary: ``infos`` (slides done now), ``errors`` (errors.csv rows), ``done``,
    ``failed``, ``already`` (done by an earlier run). Nothing is written when the start fails.
    """
    from openpluto.jobs.cohort import build_cohort, recorded_owner
    from openpluto.jobs.outputs import write_errors_csv
    from openpluto.jobs.runner import plan_todo, run_slides, stderr_writer
    from openpluto.jobs.shard import Shard
    from openpluto.jobs.slides import report_skipped
    from openpluto.slide.mpp import MppOverrides

    cfg = cfg or TissueConfig()
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    sh = Shard.parse(shard)
    ov = MppOverrides.parse(mpp_override)

    def record_of(slide_id: str) -> tuple[Path, dict | None]:
        return out / f"{slide_id}.json", _read_record(out / f"{slide_id}.json")

    cohort = build_cohort(inputs, sh, lambda i: recorded_owner(record_of(i)[1]))
    settings_of = lambda r: {**to_dict(cfg), "mpp_override": ov.get(r.path)}  # noqa: E731
    todo = plan_todo(cohort, record_of, settings_of, overwrite, "done")
    out.mkdir(parents=True, exist_ok=True)
    say = stderr_writer(progress)
    report_skipped(cohort.skipped, say)
    for n in todo.notes:
        say(n)
    jobs = [(j.slide_id, (j, str(out), to_dict(cfg))) for j in todo.jobs()]
    values, errors = run_slides(
        "tissue", tissue_one, jobs, {r.id: r.path for r in cohort.mine}, workers, timeout, progress, say,
        preload=TISSUE_ONE_MODULES,
    )
    errors += cohort.skipped_rows("tissue")
    write_errors_csv(out / part_name("errors.csv", sh.index, sh.count), errors)
    failed = sum(1 for e in errors if e["kind"] != "skipped") + cohort.skipped_failures
    summary = {
        "shard": sh.label,
        "slides_total": len(cohort.mine) + cohort.skipped_failures,
        "done": len(values) + len(todo.already),
        "already": len(todo.already),
        "failed": failed,
        "seconds": round(time.time() - t0, 2),
        "config": to_dict(cfg),
    }
    write_json_atomic(out / part_name("summary.json", sh.index, sh.count), summary)
    return {**summary, "infos": [values[r.id] for r in cohort.mine if r.id in values], "errors": errors}

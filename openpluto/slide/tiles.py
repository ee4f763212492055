"""Slides -> multi-resolution tiles of usable tissue in WebDataset tar shards, resumable and shardable.

Layout of ``OUT``::

    shards/<id>-000000.tar        samples: <key>.jpg (RGB tile) + <key>.json (metadata), webdataset's writer
    manifests/<id>.csv            one row per tile of that slide
    done/<id>.json                per-slide record (slide identity, settings + fingerprint, counts);
                                  written last, marks the slide finished
    qc/<id>_overlay.png, qc/<id>_mask.png, qc/<id>.geojson, qc/mosaic_mpp<m>.png
    manifest.csv, errors.csv, summary.json      (``--shard I/N``: manifest.part-I-of-N.csv, ...)

``<id>`` is the slide id (:func:`openpluto.jobs.slides.assign_ids`). A slide's shards are written under
``shards/.partial/<id>/`` and renamed into place only when the slide is complete; a rerun skips slides
whose record matches the slide file and the settings, refuses other settings (``--overwrite`` redoes)
and redoes the others from scratch, so a killed run never leaves duplicates or partial shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from openpluto.config import from_dict, to_dict
from openpluto.io import atomic_path, write_json_atomic, write_text_atomic
from openpluto.jobs.outputs import part_name, read_csv_union
from openpluto.jobs.slides import SLIDE_EXTENSIONS
from openpluto.slide.config import TilesConfig, TissueConfig
from openpluto.slide.tissue_batch import TISSUE_ONE_MODULES

__all__ = ["SLIDE_EXTENSIONS", "run_tiles", "read_tile_manifest", "tile_slide", "tile_key"]

MANIFEST_COLUMNS = (
    "key",
    "shard",
    "slide",
    "path",
    "x",
    "y",
    "mpp",
    "tile_size",
    "size_l0",
    "level",
    "tissue_fraction",
    "modality",
)
# TilesConfig fields that do not change the tiles (how the run goes, not what it makes).
RUN_FIELDS = ("workers", "timeout", "qc", "mpp_override", "shard", "overwrite", "modality")
READ_BATCH = 64  # tile corners per TileReader.read call (runs of neighbours are found within a batch)


def tiles_settings(cfg: TilesConfig, tissue_cfg: TissueConfig, mpp_override: float | None) -> dict:
    """What shapes a slide's tiles: the tile settings, the tissue settings and its µm/px override."""
    tiles = {k: v for k, v in to_dict(cfg).items() if k not in RUN_FIELDS}
    return {**tiles, "mpp_override": mpp_override, "tissue": to_dict(tissue_cfg)}


def tile_key(name: str, mpp: float, size: int, x: int, y: int) -> str:
    """WebDataset key (no dots): ``<slide>_m0500_s275_x1024_y2048`` (mpp in nm/px)."""
    return f"{name}_m{int(round(mpp * 1000)):04d}_s{size}_x{x}_y{y}"


def _shard_re(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}-\d{{6}}\.tar$")


# ----------------------------------------------------------------------------- shard writer


def shard_writer(folder: Path, slide_id: str, max_count: int):
    """webdataset's ShardWriter: ``<folder>/<id>-000000.tar``, ... of at most ``max_count`` samples.

    USTAR tars with mtime 0, so the same tiles always give the same bytes.
    """
    import webdataset as wds  # lazily: not every machine that imports openpluto has it

    folder.mkdir(parents=True, exist_ok=True)
    return wds.ShardWriter(
        str(folder / f"{slide_id}-%06d.tar"),
        maxcount=max_count,
        maxsize=float("inf"),
        verbose=0,
        mtime=0,
        user="",
        group="",
        mode=0o644,
    )


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- one slide


def plan_tiles(slide, result, cfg: TilesConfig, slide_id: str) -> tuple[list[tuple], list[str]]:
    """Tile sets [(mpp, size, level, coords [N, 3])] and warnings (targets refused for this slide).

    A target finer than the scan (without ``allow_upsample``) or a tile larger than the slide is
    refused with a warning; when every target is refused, or no tile has enough usable tissue, the
    slide fails with one line (a slide never "succeeds" with 0 tiles).
    """
    from openpluto.slide.reader import SlideError
    from openpluto.slide.tissue import grid_tiles

    sets, warnings = [], []
    seed = int(hashlib.sha1(slide_id.encode()).hexdigest()[:8], 16) ^ cfg.seed
    w0, h0 = slide.dimensions
    for mpp in cfg.mpp:
        try:
            level = slide.level_for_mpp(mpp, cfg.allow_upsample)
        except SlideError as e:
            warnings.append(str(e))
            continue
        for size in cfg.tile_size:
            size_l0 = size * mpp / slide.mpp
            if size_l0 > min(w0, h0):
                warnings.append(
                    f"{slide.path}: a {size} px tile at {mpp:g} µm/px spans {size_l0:.0f} level-0 px, more "
                    f"than the slide ({w0} x {h0} px); use a smaller --tile-size or a finer --mpp"
                )
                continue
            coords = grid_tiles(slide, result, mpp, size, cfg.min_tissue, cfg.overlap)
            if cfg.tiles_per_slide and len(coords) > cfg.tiles_per_slide:
                rng = np.random.default_rng([seed, int(mpp * 1000), size])
                pick = np.sort(rng.choice(len(coords), cfg.tiles_per_slide, replace=False))
                coords = coords[pick]
            sets.append((float(mpp), int(size), int(level), coords))
    if not sets:
        prefix = f"{slide.path}: "
        reasons = dict.fromkeys(w[len(prefix) :] if w.startswith(prefix) else w for w in warnings)
        raise SlideError(prefix + "; ".join(reasons))
    if not any(len(c) for *_, c in sets):
        raise SlideError(
            f"{slide.path}: no tile has >= {cfg.min_tissue:.0%} usable tissue at any --mpp x --tile-size "
            "(lower --min-tissue, or check the mask with `openpluto tissue`)"
        )
    return sets, warnings


def modality_fields(result) -> dict:
    """What a slide's outputs record about its modality (see ``openpluto.slide.tissue``)."""
    return {"modality": result.modality, "stain": result.stain, "dab_fraction": result.dab_fraction}


def _tile_meta(
    slide, path: str, slide_id: str, mpp: float, size: int, level: int, x: int, y: int, frac: float
) -> dict:
    return {
        "slide": slide_id,
        "path": str(path),
        "x": x,
        "y": y,
        "mpp": mpp,
        "size": size,
        "size_l0": round(size * mpp / slide.mpp, 3),
        "level": level,
        "level_downsample": slide.level_downsamples[level],
        "tissue_fraction": round(float(frac), 4),
        "slide_mpp": slide.mpp,
    }


def read_tile_set(
    path: str | os.PathLike, mpp: float, size: int, coords: np.ndarray,
    mpp_override: float | None = None, allow_upsample: bool = False,
) -> Iterator[np.ndarray]:
    """The ``size`` px tiles at ``mpp`` µm/px of level-0 corners ``coords`` [N, >=2], in order, as
    uint8 [size, size, 3], read by the throughput reader (``fastread.TileReader``: runs of neighbours
    read once, raw JPEG tiles with DCT scaling), :data:`READ_BATCH` corners per ``read`` call."""
    from openpluto.slide.fastread import TileReader

    with TileReader(path, mpp, size, mpp_override=mpp_override, allow_upsample=allow_upsample) as r:
        for a in range(0, len(coords), READ_BATCH):
            yield from r.read(coords[a:a + READ_BATCH, :2])


def write_tiles(
    slide, path: str, slide_id: str, sets: list[tuple], cfg: TilesConfig, partial: Path, modality: dict
) -> list[dict]:
    """Read (:func:`read_tile_set`) and JPEG-encode every planned tile into ``partial`` shards; return
    the manifest rows. ``modality`` (:func:`modality_fields`) goes into every tile's json; the manifest
    gets one word of it.
    """
    rows: list[dict] = []
    writer = shard_writer(partial, slide_id, cfg.shard_size)
    override = slide.mpp if slide.mpp_source == "override" else None
    try:
        for mpp, size, level, coords in sets:
            tiles = read_tile_set(path, mpp, size, coords, override, cfg.allow_upsample)
            for tile, (x, y, frac) in zip(tiles, coords):  # tiles first: the reader closes when they end
                x, y = int(x), int(y)
                img = Image.fromarray(tile)
                key = tile_key(slide_id, mpp, size, x, y)
                meta = {**_tile_meta(slide, path, slide_id, mpp, size, level, x, y, frac),
                        "modality": modality["modality"], "stain": modality["stain"]}
                jpg = _jpeg(img, cfg.jpeg_quality)
                writer.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta).encode()})
                shard = Path(writer.fname).name
                rows.append(
                    {
                        **{k: meta[k] for k in ("slide", "path", "x", "y", "mpp", "level")},
                        "key": key,
                        "shard": f"shards/{shard}",
                        "tile_size": size,
                        "size_l0": meta["size_l0"],
                        "tissue_fraction": meta["tissue_fraction"],
                        "modality": modality["stain"] or modality["modality"],  # he, ihc, fluorescence
                    }
                )
    finally:
        writer.close()
    return rows


# What tile_slide imports (lazily, to keep `import openpluto.slide.tiles` light): tissue_one's modules,
# the fast reader and the shard writer (webdataset imports torch). run_tiles imports them once before it
# forks the slide processes.
TILE_SLIDE_MODULES = (*TISSUE_ONE_MODULES, "openpluto.slide.fastread", "webdataset")


def tile_slide(job, out: str, cfg_dict: dict, tissue_dict: dict) -> dict:
    """Tile one slide (a :class:`openpluto.jobs.cohort.SlideJob`) into ``out`` (run inside a worker
    process); return its record (``done/<id>.json``)."""
    from openpluto.slide import geojson, qc
    from openpluto.slide.reader import open_slide
    from openpluto.slide.tissue import detect_tissue

    t0 = time.time()
    path, slide_id = job.path, job.slide_id
    cfg = from_dict(TilesConfig, cfg_dict)
    tcfg = from_dict(TissueConfig, tissue_dict)
    out_p = Path(out)
    shards_dir = out_p / "shards"
    partial = shards_dir / ".partial" / slide_id
    _forget_slide(out_p, slide_id)
    with open_slide(path, mpp_override=job.mpp_override) as slide:
        result = detect_tissue(slide, tcfg)
        t_mask = time.time() - t0
        if not result.matches_modality(cfg.modality):  # no done record: a rerun may ask for it
            return {**job.record(), "status": "left_out", **modality_fields(result)}
        sets, warnings = plan_tiles(slide, result, cfg, slide_id)
        rows = write_tiles(slide, path, slide_id, sets, cfg, partial, modality_fields(result))
        counts = {f"{m:g}um_{s}px": len(c) for m, s, _, c in sets}
        record = {
            **job.record(),
            "status": "ok",
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "dimensions": list(slide.dimensions),
            "backend": slide.backend,
            "vendor": slide.vendor,
            "levels": {f"{m:g}": lv for m, _, lv, _ in sets},
            "tiles": counts,
            "n_tiles": len(rows),
            "tissue_mm2": result.area_mm2(),
            "usable_mm2": result.area_mm2(result.usable),
            "artifact_mm2": {k: result.area_mm2(v) for k, v in result.artifacts.items()},
            "dark_background": result.dark_background,
            **modality_fields(result),
            "warnings": warnings,
            "mask_seconds": round(t_mask, 3),
        }
        if cfg.qc:
            qdir = out_p / "qc"
            drawn = {f"{m:g}um {s}px": (c, s * m / slide.mpp) for m, s, _, c in sets}
            qc.save_overlay(
                qdir / f"{slide_id}_overlay.png", result, drawn, title=f"{slide_id}  ({slide.mpp:.4g} um/px)"
            )
            qc.save_mask(qdir / f"{slide_id}_mask.png", result)
            masks = {"tissue": result.tissue, **{k: v for k, v in result.artifacts.items() if v.any()}}
            geojson.write_geojson(qdir / f"{slide_id}.geojson", masks, result.downsample, slide_id)
    # Finalize: shards into place, then the manifest, then the done record (last).
    shards_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(partial.glob("*.tar")):
        os.replace(p, shards_dir / p.name)
    shutil.rmtree(partial, ignore_errors=True)
    _write_csv(out_p / "manifests" / f"{slide_id}.csv", rows, MANIFEST_COLUMNS)
    record["seconds"] = round(time.time() - t0, 3)
    write_json_atomic(out_p / "done" / f"{slide_id}.json", record)
    return record


def _forget_slide(out: Path, slide_id: str) -> None:
    """Remove every trace of an unfinished slide (record, partial folder, orphaned shards, manifest)."""
    (out / "done" / f"{slide_id}.json").unlink(missing_ok=True)
    shutil.rmtree(out / "shards" / ".partial" / slide_id, ignore_errors=True)
    pat = _shard_re(slide_id)
    shards = out / "shards"
    if shards.is_dir():
        for p in shards.iterdir():
            if pat.match(p.name):
                p.unlink(missing_ok=True)
    (out / "manifests" / f"{slide_id}.csv").unlink(missing_ok=True)


def _write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_tile_manifest(out: str | os.PathLike) -> list[dict]:
    """Every tile of a tiles folder: the union of ``manifest.csv`` and its shard parts (each key once)."""
    return read_csv_union(out, "manifest.csv", key="key")


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the batch


def run_tiles(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: TilesConfig | None = None,
    tissue_cfg: TissueConfig | None = None,
    progress: bool = True,
) -> dict:
    """Tile every slide of ``inputs`` (this shard's share) into ``out``; return the summary.

    Inputs, settings and earlier outputs are checked before anything is written: a bad start raises
    a one-line error and leaves no ``out`` folder behind.
    """
    from openpluto.jobs.cohort import build_cohort, recorded_owner
    from openpluto.jobs.runner import plan_todo, run_slides, stderr_writer
    from openpluto.jobs.shard import Shard
    from openpluto.jobs.slides import report_skipped
    from openpluto.slide.mpp import MppOverrides

    cfg = cfg or TilesConfig()
    tissue_cfg = tissue_cfg or TissueConfig()
    cfg.validate()
    tissue_cfg.validate()
    out = Path(out)
    t0 = time.time()
    shard = Shard.parse(cfg.shard)
    overrides = MppOverrides.parse(cfg.mpp_override)

    def record_of(slide_id: str) -> tuple[Path, dict | None]:
        where = out / "done" / f"{slide_id}.json"
        return where, _read_record(where)

    cohort = build_cohort(inputs, shard, lambda i: recorded_owner(record_of(i)[1]))
    settings_of = lambda r: tiles_settings(cfg, tissue_cfg, overrides.get(r.path))  # noqa: E731
    todo = plan_todo(cohort, record_of, settings_of, cfg.overwrite, "tiled")
    out.mkdir(parents=True, exist_ok=True)
    say = stderr_writer(progress)
    report_skipped(cohort.skipped, say)
    for n in todo.notes:
        say(n)
    jobs = [(j.slide_id, (j, str(out), to_dict(cfg), to_dict(tissue_cfg))) for j in todo.jobs()]
    paths = {r.id: r.path for r in cohort.mine}
    values, errors = run_slides(
        "tiles", tile_slide, jobs, paths, cfg.workers, cfg.timeout, progress, say,
        on_fail=lambda i: _forget_slide(out, i),  # no partial shards left by a failed or killed worker
        preload=TILE_SLIDE_MODULES,
    )
    left_out = [
        {"slide": i, "path": str(paths[i]), "modality": v["modality"], "stain": v["stain"],
         "dab_fraction": v["dab_fraction"]}
        for i, v in values.items() if v.get("status") == "left_out"
    ]
    if left_out:
        kinds = ", ".join(f"{r['slide']} ({r['stain'] or r['modality']})" for r in left_out)
        say(f"tiles: left out {len(left_out)} slide(s) that are not {cfg.modality}: {kinds}; "
            "--modality any tiles every slide")
    return finalize(out, cohort, errors, todo.already, cfg, seconds=time.time() - t0, left_out=left_out)


def finalize(
    out: Path,
    cohort,
    errors: list[dict],
    skipped: Sequence[str],
    cfg: TilesConfig,
    seconds: float,
    left_out: Sequence[dict] = (),
) -> dict:
    """Write this shard's manifest, errors and summary (``manifest.part-I-of-N.csv``, ... with --shard)."""
    from openpluto.jobs.outputs import error_row, write_errors_csv

    shard = cohort.shard
    mine = [r.id for r in cohort.mine]
    records = {}
    listed = sorted(p.stem for p in (out / "done").glob("*.json")) if shard.count == 1 else mine
    for i in listed:
        rec = _read_record(out / "done" / f"{i}.json")
        if rec is not None:
            records[i] = rec
    rows: list[dict] = []
    for i in records:
        mp_ = out / "manifests" / f"{i}.csv"
        if mp_.is_file():
            rows.extend(read_manifest(mp_))
    _write_csv(out / part_name("manifest.csv", shard.index, shard.count), rows, MANIFEST_COLUMNS)
    warn_rows = [
        error_row(i, records[i]["path"], "tiles", "warning", w)
        for i in mine
        if i in records
        for w in records[i].get("warnings", [])
    ]
    write_errors_csv(
        out / part_name("errors.csv", shard.index, shard.count),
        errors + warn_rows + cohort.skipped_rows("tiles"),
    )
    per_set: dict[str, int] = {}
    for r in rows:
        k = f"{float(r['mpp']):g}um_{r['tile_size']}px"
        per_set[k] = per_set.get(k, 0) + 1
    summary = {
        "shard": shard.label,
        "slides_total": len(mine) + cohort.skipped_failures,
        "slides_ok": sum(1 for i in mine if i in records),
        "slides_failed": len(errors) + cohort.skipped_failures,
        "slides_skipped_already_done": len(skipped),
        "slides_left_out_modality": list(left_out),
        "tiles_total": len(rows),
        "tiles_per_set": per_set,
        "seconds": round(seconds, 2),
        "failed": [
            {"slide": e["slide_id"] or e["path"], "error": e["error"]}
            for e in errors + cohort.skipped_rows("tiles", failed_only=True)
        ],
        "config": to_dict(cfg),
    }
    write_json_atomic(out / part_name("summary.json", shard.index, shard.count), summary)
    if cfg.qc and rows and shard.count == 1:
        write_mosaics(out, rows, seed=cfg.seed)
    return summary


def write_mosaics(out: Path, rows: list[dict], per_mpp: int = 32, seed: int = 0) -> list[Path]:
    """``qc/mosaic_mpp<m>.png``: up to ``per_mpp`` random tiles at each µm/px read back from the shards."""
    from openpluto.slide.qc import save_mosaic

    rng = np.random.default_rng(seed)
    paths = []
    for mpp in sorted({r["mpp"] for r in rows}, key=float):
        sel = [r for r in rows if r["mpp"] == mpp]
        pick = [sel[i] for i in sorted(rng.choice(len(sel), min(per_mpp, len(sel)), replace=False))]
        by_shard: dict[str, set[str]] = {}
        for r in pick:
            by_shard.setdefault(r["shard"], set()).add(r["key"] + ".jpg")
        tiles = []
        for shard, members in by_shard.items():
            try:
                with tarfile.open(out / shard) as tf:
                    for m in tf:
                        if m.name in members:
                            tiles.append(
                                np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
                            )
            except (OSError, tarfile.TarError):
                continue
        if tiles:
            p = out / "qc" / f"mosaic_mpp{float(mpp):g}.png"
            save_mosaic(p, tiles, title=f"{len(tiles)} random tiles at {float(mpp):g} um/px")
            paths.append(p)
    return paths


def format_summary(summary: dict) -> str:
    lines = [
        f"slides: {summary['slides_ok']}/{summary['slides_total']} done "
        f"({summary['slides_skipped_already_done']} already done before), {summary['slides_failed']} failed; "
        f"{summary['tiles_total']} tiles in {summary['seconds']:.1f} s"
    ]
    for k, v in sorted(summary["tiles_per_set"].items(), key=lambda kv: (float(kv[0].split("um")[0]), kv[0])):
        lines.append(f"  {k:>14}: {v}")
    for f in summary["failed"]:
        lines.append(f"  failed {f['slide']}: {f['error']}")
    for r in summary.get("slides_left_out_modality", []):
        lines.append(f"  left out {r['slide']}: {r['stain'] or r['modality']} (--modality)")
    return "\n".join(lines)


def write_text_summary(out: Path, summary: dict) -> None:
    write_text_atomic(out / "summary.txt", format_summary(summary) + "\n")

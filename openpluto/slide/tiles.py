"""Slides -> multi-resolution tiles of usable tissue in WebDataset tar shards, resumable.

Layout of ``OUT``::

    shards/<slide>-000000.tar     samples: <key>.jpg (RGB tile) + <key>.json (metadata)
    manifests/<slide>.csv         one row per tile of that slide
    done/<slide>.json             per-slide summary; written last, marks the slide finished
    qc/<slide>_overlay.png, qc/<slide>_mask.png, qc/<slide>.geojson, qc/mosaic_mpp<m>.png
    manifest.csv, errors.csv, summary.json

A slide's shards are written under ``shards/.partial/<slide>/`` and renamed into place only when
the slide is complete; a rerun skips slides with a done marker and redoes the others from scratch
(deleting their partial or orphaned shards), so a killed run never leaves duplicates or partial shards.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from openpluto.config import from_dict, to_dict
from openpluto.io import atomic_path, write_json_atomic, write_text_atomic
from openpluto.slide.config import TilesConfig, TissueConfig

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
ERROR_COLUMNS = ("slide", "path", "kind", "error")


# ----------------------------------------------------------------------------- inputs and names


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Slide files from files and folders (folders searched recursively by slide extension)."""
    from openpluto.slide.reader import SlideError

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(
                sorted(
                    q
                    for q in p.rglob("*")
                    if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS and not q.name.startswith(".")
                )
            )
        elif p.exists():
            out.append(p)
        else:
            raise SlideError(f"{p}: no such slide file or folder")
    seen: set[Path] = set()
    uniq = []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            uniq.append(p)
    return uniq


def slide_names(paths: Sequence[Path]) -> list[str]:
    """Unique, file-system and WebDataset-safe names (file stems; a short hash resolves clashes)."""
    base = [re.sub(r"[^A-Za-z0-9_-]+", "_", p.stem) or "slide" for p in paths]
    counts: dict[str, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    return [
        b if counts[b] == 1 else f"{b}_{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
        for b, p in zip(base, paths)
    ]


def tile_key(name: str, mpp: float, size: int, x: int, y: int) -> str:
    """WebDataset key (no dots): ``<slide>_m0500_s275_x1024_y2048`` (mpp in nm/px)."""
    return f"{name}_m{int(round(mpp * 1000)):04d}_s{size}_x{x}_y{y}"


def _shard_re(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}-\d{{6}}\.tar$")


# ----------------------------------------------------------------------------- shard writer


class ShardWriter:
    """Tar shards of at most ``max_count`` samples: ``<folder>/<name>-000000.tar``, ..."""

    def __init__(self, folder: Path, name: str, max_count: int):
        self.folder, self.name, self.max_count = Path(folder), name, max_count
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index, self.count, self.tar, self.paths = -1, 0, None, []

    def _next(self) -> None:
        self.close()
        self.index += 1
        path = self.folder / f"{self.name}-{self.index:06d}.tar"
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in close()
        self.paths.append(path)
        self.count = 0

    def _add(self, member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, sample: dict[str, bytes]) -> str:
        """Add one sample (extension -> bytes); return the shard file name."""
        if self.tar is None or self.count >= self.max_count:
            self._next()
        for ext, data in sample.items():
            self._add(f"{key}.{ext}", data)
        self.count += 1
        return self.paths[-1].name

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- one slide


def plan_tiles(slide, result, cfg: TilesConfig, name: str) -> tuple[list[tuple], list[str]]:
    """Tile sets [(mpp, size, level, coords [N, 3])] and warnings (targets refused for this slide)."""
    from openpluto.slide.reader import SlideError
    from openpluto.slide.tissue import grid_tiles

    sets, warnings = [], []
    seed = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) ^ cfg.seed
    for mpp in cfg.mpp:
        try:
            level = slide.level_for_mpp(mpp, cfg.allow_upsample)
        except SlideError as e:
            warnings.append(str(e))
            continue
        for size in cfg.tile_size:
            coords = grid_tiles(slide, result, mpp, size, cfg.min_tissue, cfg.overlap)
            if cfg.tiles_per_slide and len(coords) > cfg.tiles_per_slide:
                rng = np.random.default_rng([seed, int(mpp * 1000), size])
                pick = np.sort(rng.choice(len(coords), cfg.tiles_per_slide, replace=False))
                coords = coords[pick]
            sets.append((float(mpp), int(size), int(level), coords))
    return sets, warnings


def tile_slide(
    path: str, out: str, name: str, cfg_dict: dict, tissue_dict: dict, mpp_override: float | None
) -> dict:
    """Tile one slide into ``out`` (run inside a worker process); return its summary dict."""
    from openpluto.slide import geojson, qc
    from openpluto.slide.reader import open_slide
    from openpluto.slide.tissue import detect_tissue

    t0 = time.time()
    cfg = from_dict(TilesConfig, cfg_dict)
    tcfg = from_dict(TissueConfig, tissue_dict)
    out_p = Path(out)
    shards_dir = out_p / "shards"
    partial = shards_dir / ".partial" / name
    _forget_slide(out_p, name)
    partial.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    counts: dict[str, int] = {}
    levels: dict[str, int] = {}
    with open_slide(path, mpp_override=mpp_override) as slide:
        result = detect_tissue(slide, tcfg)
        t_mask = time.time() - t0
        if not result.matches_modality(cfg.modality):  # no done marker: a rerun may ask for it
            shutil.rmtree(partial, ignore_errors=True)
            return {"slide": name, "path": str(path), "status": "left_out", **_modality(result)}
        sets, warnings = plan_tiles(slide, result, cfg, name)
        writer = ShardWriter(partial, name, cfg.shard_size)
        try:
            for mpp, size, level, coords in sets:
                size_l0 = size * mpp / slide.mpp
                levels[f"{mpp:g}"] = level
                counts[f"{mpp:g}um_{size}px"] = len(coords)
                for x, y, frac in coords:
                    x, y = int(x), int(y)
                    img = slide.read_image(x, y, size, mpp, allow_upsample=cfg.allow_upsample)
                    key = tile_key(name, mpp, size, x, y)
                    meta = {
                        "slide": name,
                        "path": str(path),
                        "x": x,
                        "y": y,
                        "mpp": mpp,
                        "size": size,
                        "size_l0": round(size_l0, 3),
                        "level": level,
                        "level_downsample": slide.level_downsamples[level],
                        "tissue_fraction": round(float(frac), 4),
                        "slide_mpp": slide.mpp,
                        **_modality(result),
                    }
                    shard = writer.write(
                        key, {"jpg": _jpeg(img, cfg.jpeg_quality), "json": json.dumps(meta).encode()}
                    )
                    rows.append(
                        {
                            "key": key,
                            "shard": f"shards/{shard}",
                            "slide": name,
                            "path": str(path),
                            "x": x,
                            "y": y,
                            "mpp": mpp,
                            "tile_size": size,
                            "size_l0": round(size_l0, 3),
                            "level": level,
                            "tissue_fraction": round(float(frac), 4),
                            "modality": _modality_label(result),
                        }
                    )
        finally:
            writer.close()
        summary = {
            "slide": name,
            "path": str(path),
            "status": "ok",
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "dimensions": list(slide.dimensions),
            "backend": slide.backend,
            "vendor": slide.vendor,
            "levels": levels,
            "tiles": counts,
            "n_tiles": len(rows),
            "tissue_mm2": result.area_mm2(),
            "usable_mm2": result.area_mm2(result.usable),
            "artifact_mm2": {k: result.area_mm2(v) for k, v in result.artifacts.items()},
            "dark_background": result.dark_background,
            **_modality(result),
            "warnings": warnings,
            "mask_seconds": round(t_mask, 3),
        }
        if cfg.qc:
            qdir = out_p / "qc"
            drawn = {f"{m:g}um {s}px": (c, s * m / slide.mpp) for m, s, _, c in sets}
            qc.save_overlay(
                qdir / f"{name}_overlay.png", result, drawn, title=f"{name}  ({slide.mpp:.4g} um/px)"
            )
            qc.save_mask(qdir / f"{name}_mask.png", result)
            masks = {"tissue": result.tissue, **{k: v for k, v in result.artifacts.items() if v.any()}}
            geojson.write_geojson(qdir / f"{name}.geojson", masks, result.downsample, name)
    # Finalize: shards into place, then the manifest, then the done marker (last).
    shards_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(partial.glob("*.tar")):
        os.replace(p, shards_dir / p.name)
    shutil.rmtree(partial, ignore_errors=True)
    _write_csv(out_p / "manifests" / f"{name}.csv", rows, MANIFEST_COLUMNS)
    summary["seconds"] = round(time.time() - t0, 3)
    write_json_atomic(out_p / "done" / f"{name}.json", summary)
    return summary


def _modality(result) -> dict:
    """What a slide's outputs record about its modality (see ``openpluto.slide.tissue``)."""
    return {"modality": result.modality, "stain": result.stain, "dab_fraction": result.dab_fraction}


def _modality_label(result) -> str:
    """One word for the manifest: ``he``, ``ihc`` or ``fluorescence``."""
    return result.stain or result.modality


def _forget_slide(out: Path, name: str) -> None:
    """Remove every trace of an unfinished slide (partial folder, orphaned shards, manifest)."""
    shutil.rmtree(out / "shards" / ".partial" / name, ignore_errors=True)
    pat = _shard_re(name)
    shards = out / "shards"
    if shards.is_dir():
        for p in shards.iterdir():
            if pat.match(p.name):
                p.unlink(missing_ok=True)
    (out / "manifests" / f"{name}.csv").unlink(missing_ok=True)


def _write_csv(path: Path, rows: Iterable[dict], columns: Sequence[str]) -> None:
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the batch


def run_tiles(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    cfg: TilesConfig | None = None,
    tissue_cfg: TissueConfig | None = None,
    progress: bool = True,
) -> dict:
    """Tile every slide of ``inputs`` into ``out`` (see the module docstring); return the summary."""
    from tqdm import tqdm

    from openpluto.slide.batch import run_isolated
    from openpluto.slide.mpp import MppOverrides

    cfg = cfg or TilesConfig()
    tissue_cfg = tissue_cfg or TissueConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    paths = expand_inputs(inputs)
    names = slide_names(paths)
    overrides = MppOverrides.parse(cfg.mpp_override)
    done_dir = out / "done"
    jobs, skipped = [], []
    for p, n in zip(paths, names):
        if (done_dir / f"{n}.json").is_file():
            skipped.append(n)
            continue
        jobs.append((n, (str(p), str(out), n, to_dict(cfg), to_dict(tissue_cfg), overrides.get(p))))
    by_name = dict(zip(names, paths))
    errors: list[dict] = []
    left_out: list[dict] = []
    bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress or not jobs)
    for o in run_isolated(tile_slide, jobs, workers=cfg.workers, timeout=cfg.timeout):
        if o.ok and o.value.get("status") == "left_out":
            left_out.append({k: o.value[k] for k in ("slide", "path", "modality", "stain", "dab_fraction")})
        elif o.ok:
            bar.set_postfix(tiles=o.value.get("n_tiles", 0), refresh=False)
        else:
            errors.append({"slide": o.key, "path": str(by_name[o.key]), "kind": o.kind, "error": o.error})
            _forget_slide(out, o.key)  # no partial shards left behind by a failed or killed worker
            bar.write(
                f"error: {o.error}"
                if str(by_name[o.key]) in o.error
                else f"error: {by_name[o.key]}: {o.error}"
            )
        bar.update(1)
    bar.close()
    if left_out:
        kinds = ", ".join(f"{r['slide']} ({r['stain'] or r['modality']})" for r in left_out)
        print(f"tiles: left out {len(left_out)} slide(s) that are not {cfg.modality}: {kinds}; "
              "--modality any tiles every slide", file=sys.stderr)
    summary = finalize(out, names, errors, skipped, cfg, seconds=time.time() - t0, left_out=left_out)
    return summary


def finalize(
    out: Path,
    names: Sequence[str],
    errors: list[dict],
    skipped: Sequence[str],
    cfg: TilesConfig,
    seconds: float,
    left_out: Sequence[dict] = (),
) -> dict:
    """Rebuild manifest.csv (all finished slides in ``out``), errors.csv, summary.json and mosaics."""
    done = {}
    for p in sorted((out / "done").glob("*.json")):
        done[p.stem] = json.loads(p.read_text())
    rows: list[dict] = []
    for n in done:
        mp_ = out / "manifests" / f"{n}.csv"
        if mp_.is_file():
            rows.extend(read_manifest(mp_))
    _write_csv(out / "manifest.csv", rows, MANIFEST_COLUMNS)
    warn_rows = [
        {"slide": n, "path": done[n]["path"], "kind": "warning", "error": w}
        for n in names
        if n in done
        for w in done[n].get("warnings", [])
    ]
    _write_csv(out / "errors.csv", errors + warn_rows, ERROR_COLUMNS)
    per_set: dict[str, int] = {}
    for r in rows:
        k = f"{float(r['mpp']):g}um_{r['tile_size']}px"
        per_set[k] = per_set.get(k, 0) + 1
    summary = {
        "slides_total": len(names),
        "slides_ok": sum(1 for n in names if n in done),
        "slides_failed": len(errors),
        "slides_skipped_already_done": len(skipped),
        "slides_left_out_modality": list(left_out),
        "tiles_total": len(rows),
        "tiles_per_set": per_set,
        "seconds": round(seconds, 2),
        "failed": [{"slide": e["slide"], "error": e["error"]} for e in errors],
        "config": to_dict(cfg),
    }
    write_json_atomic(out / "summary.json", summary)
    if cfg.qc and rows:
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

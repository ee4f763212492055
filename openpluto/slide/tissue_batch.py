"""``openpluto tissue``: masks, GeoJSON and QC overlays for a batch of slides (one worker process each)."""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path

from openpluto.config import from_dict, to_dict
from openpluto.io import atomic_path, write_json_atomic
from openpluto.slide.config import TissueConfig


def tissue_one(path: str, out: str, name: str, tissue_dict: dict, mpp_override: float | None) -> dict:
    """Write ``<name>_mask.png``, ``_overlay.png``, ``.geojson`` and ``.json`` into ``out``."""
    from openpluto.slide import geojson, qc
    from openpluto.slide.reader import open_slide
    from openpluto.slide.tissue import detect_tissue

    t0 = time.time()
    cfg = from_dict(TissueConfig, tissue_dict)
    out_p = Path(out)
    with open_slide(path, mpp_override=mpp_override, require_mpp=False) as slide:
        r = detect_tissue(slide, cfg)
        mpp_txt = f"{slide.mpp:.4g} um/px" if slide.mpp else "no mpp"
        qc.save_overlay(out_p / f"{name}_overlay.png", r, title=f"{name}  ({mpp_txt})")
        qc.save_mask(out_p / f"{name}_mask.png", r)
        masks = {"tissue": r.tissue, **{k: v for k, v in r.artifacts.items() if v.any()}}
        geojson.write_geojson(out_p / f"{name}.geojson", masks, r.downsample, name)
        info = {
            "slide": name,
            "path": str(path),
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
    write_json_atomic(out_p / f"{name}.json", info)
    return info


def run_tissue(
    inputs: Sequence[str],
    out: str | Path,
    cfg: TissueConfig | None = None,
    mpp_override: str | None = None,
    workers: int = 1,
    timeout: float = 600.0,
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Tissue masks for every slide; returns (per-slide info, error rows) and writes ``errors.csv``."""
    from tqdm import tqdm

    from openpluto.slide.batch import run_isolated
    from openpluto.slide.mpp import MppOverrides
    from openpluto.slide.tiles import ERROR_COLUMNS, expand_inputs, slide_names

    cfg = cfg or TissueConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(inputs)
    names = slide_names(paths)
    ov = MppOverrides.parse(mpp_override)
    jobs = [(n, (str(p), str(out), n, to_dict(cfg), ov.get(p))) for p, n in zip(paths, names)]
    by_name = dict(zip(names, paths))
    infos, errors = [], []
    bar = tqdm(total=len(jobs), desc="tissue", unit="slide", disable=not progress)
    for o in run_isolated(tissue_one, jobs, workers=workers, timeout=timeout):
        if o.ok:
            infos.append(o.value)
        else:
            errors.append({"slide": o.key, "path": str(by_name[o.key]), "kind": o.kind, "error": o.error})
            bar.write(f"error: {o.error}")
        bar.update(1)
    bar.close()
    with atomic_path(out / "errors.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ERROR_COLUMNS))
        w.writeheader()
        w.writerows(errors)
    return infos, errors

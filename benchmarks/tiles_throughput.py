"""Tile throughput of `openpluto tiles` vs raw OpenSlide, tissue-mask time, and peak memory vs slide size.

For each slide and target µm/px, the tiles `openpluto tiles` would take (275 px, usable-tissue grid,
``--tiles`` sampled per target as ``--tiles-per-slide`` does, in its order) are read
  raw:        openslide.OpenSlide.read_region of the level region each tile needs (no resize, RGBA),
              one call per tile: the reference;
  tilereader: what `tiles` reads with, ``tiles.read_tile_set`` (fastread.TileReader opened per target,
              64 corners per read call: runs of neighbours read once, raw JPEG tiles, DCT scaling);
  pipeline:   what `tiles` does per target, ``tiles.write_tiles`` (the reads above + JPEG encode +
              webdataset shard write with the tile's json, on disk in a temporary folder);
  slide_read: openpluto Slide.read per tile (level choice + antialiased resize; `tiles` before the
              throughput reader, kept so earlier README rows stay comparable),
each with its own slide handle after a warm-up pass (so the OS file cache is warm for all).
Peak memory: `tile_slide` run in a fresh process per slide size (VmHWM of that process).

    python benchmarks/tiles_throughput.py           # synthetic 4k + 8k slides (+ the NDPI if present)
    python benchmarks/tiles_throughput.py --sizes 4096 16384 --tiles 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from openpluto.demo.synthetic import make_synthetic_slide  # noqa: E402
from openpluto.slide import TissueConfig, detect_tissue, open_slide  # noqa: E402
from openpluto.slide.config import TilesConfig  # noqa: E402
from openpluto.slide.reader import SlideError  # noqa: E402
from openpluto.slide.tiles import modality_fields, plan_tiles, read_tile_set, write_tiles  # noqa: E402

NDPI = REPO.parent / "shared" / "data" / "wsi" / "test3-DAPI-2-387.ndpi"
KINDS = ("raw", "tilereader", "pipeline", "slide_read")


def _raw(path: Path, slide, coords: np.ndarray, mpp: float, size: int) -> float:
    import openslide

    osr = openslide.OpenSlide(str(path))
    f = mpp / slide.mpp
    level = slide.best_level(f)
    scale = f / slide.level_downsamples[level]
    rs = max(1, math.ceil(size * scale - 1e-6))
    t0 = time.perf_counter()
    for x, y, _ in coords:
        np.asarray(osr.read_region((int(x), int(y)), level, (rs, rs)))
    dt = time.perf_counter() - t0
    osr.close()
    return dt


def _slide_read(path: Path, coords: np.ndarray, mpp: float, size: int) -> float:
    with open_slide(path) as s:
        t0 = time.perf_counter()
        for x, y, _ in coords:
            s.read(int(x), int(y), size, mpp)
        return time.perf_counter() - t0


def _tilereader(path: Path, coords: np.ndarray, mpp: float, size: int) -> float:
    t0 = time.perf_counter()
    for _ in read_tile_set(path, mpp, size, coords):
        pass
    return time.perf_counter() - t0


def _pipeline(path: Path, tile_set: tuple, cfg: TilesConfig, modality: dict, tmp: Path) -> float:
    with open_slide(path) as s, tempfile.TemporaryDirectory(dir=tmp) as partial:
        t0 = time.perf_counter()
        rows = write_tiles(s, str(path), "bench", [tile_set], cfg, Path(partial), modality)
        dt = time.perf_counter() - t0
    assert len(rows) == len(tile_set[3])
    return dt


def bench_slide(path: Path, mpps, size: int, n: int, tmp: Path, repeats: int = 2) -> dict:
    s = open_slide(path)
    t0 = time.perf_counter()
    r = detect_tissue(s, TissueConfig())
    mask_s = time.perf_counter() - t0
    out = {
        "slide": path.name,
        "dimensions": list(s.dimensions),
        "mpp": s.mpp,
        "mask_seconds": round(mask_s, 3),
        "mask_shape": list(r.tissue.shape),
        "targets": [],
    }
    for mpp in mpps:
        cfg = TilesConfig(mpp=(mpp,), tile_size=(size,), tiles_per_slide=n, qc=False)
        try:
            (tile_set,), _ = plan_tiles(s, r, cfg, "bench")  # the tiles `openpluto tiles` takes, in its order
        except SlideError:
            continue
        _, _, level, c = tile_set
        if len(c) < 5:
            continue
        timers = {
            "raw": partial(_raw, path, s, c, mpp, size),
            "tilereader": partial(_tilereader, path, c, mpp, size),
            "pipeline": partial(_pipeline, path, tile_set, cfg, modality_fields(r), tmp),
            "slide_read": partial(_slide_read, path, c, mpp, size),
        }
        timers["slide_read"]()  # warm the OS file cache
        best = dict.fromkeys(KINDS, 1e9)
        for rep in range(repeats):
            for k in KINDS if rep % 2 == 0 else KINDS[::-1]:
                best[k] = min(best[k], timers[k]())
        tps = {k: len(c) / v for k, v in best.items()}
        row = {"mpp": mpp, "level": level, "tiles": len(c)}
        row.update({f"{k}_tiles_per_s": round(tps[k], 1) for k in KINDS})
        row.update({f"{k}_vs_raw": round(tps[k] / tps["raw"], 3) for k in KINDS[1:]})
        out["targets"].append(row)
    s.close()
    return out


def peak_memory(path: Path, out_dir: Path, tiles: int) -> float:
    """Peak RSS (MiB) of a fresh process running `tile_slide` on ``path`` (all four mpps, 275 + 550 px)."""
    code = (
        "from openpluto.slide.tiles import tile_slide; from openpluto.jobs.cohort import SlideJob; "
        "from openpluto.config import to_dict; from openpluto.slide.config import TilesConfig, TissueConfig; "
        f"tile_slide(SlideJob('bench', {str(path)!r}, {{}}, {{}}), {str(out_dir)!r}, "
        f"to_dict(TilesConfig(tiles_per_slide={tiles}, qc=False, modality='any')), to_dict(TissueConfig())); "
        # VmHWM: peak RSS of this address space (ru_maxrss would include the parent's peak before exec).
        "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="synthetic slide sizes (px)")
    ap.add_argument("--slide-mpp", type=float, default=0.25, help="µm/px of the synthetic slides")
    ap.add_argument("--mpp", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--tile-size", type=int, default=275)
    ap.add_argument("--tiles", type=int, default=150, help="tiles per mpp")
    ap.add_argument("--slides", nargs="*", default=None, help="real slides (default: the NDPI if present)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    results = {"slides": [], "peak_memory_mib": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for n in args.sizes:
            p = tmp / f"synthetic_{n}.tiff"
            t0 = time.perf_counter()
            make_synthetic_slide(p, size=n, mpp=args.slide_mpp, seed=n)
            print(f"generated {p.name} in {time.perf_counter() - t0:.1f} s", flush=True)
            paths.append(p)
        extra = args.slides if args.slides is not None else ([str(NDPI)] if NDPI.is_file() else [])
        paths += [Path(p) for p in extra]
        for p in paths:
            res = bench_slide(p, args.mpp, args.tile_size, args.tiles, tmp)
            results["slides"].append(res)
            w, h = res["dimensions"]
            print(
                f"\n{res['slide']}  {w}x{h} @ {res['mpp']:.4g} um/px; "
                f"tissue mask {res['mask_seconds']:.2f} s ({res['mask_shape'][1]}x{res['mask_shape'][0]})"
            )
            cols = [f"{k}/s" for k in KINDS] + [f"{k}/raw" for k in KINDS[1:]]
            print(f"  {'mpp':>5} {'level':>5} {'tiles':>5} " + " ".join(f"{c:>14}" for c in cols))
            for t in res["targets"]:
                vals = [t[f"{k}_tiles_per_s"] for k in KINDS] + [t[f"{k}_vs_raw"] for k in KINDS[1:]]
                head = f"  {t['mpp']:>5g} {t['level']:>5} {t['tiles']:>5} "
                print(head + " ".join(f"{v:>14.2f}" for v in vals))
        print("\npeak memory of one `tile_slide` process (tiles-per-slide 100 per mpp x size):")
        for p, n in zip(paths, args.sizes):
            mib = peak_memory(p, tmp / f"out_{n}", 100)
            results["peak_memory_mib"][str(n)] = round(mib, 1)
            print(f"  {n}x{n} px slide: {mib:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiles of one slide at a target µm/px, read for throughput: blocks of tiles, raw JPEG, DCT scaling.

``TileReader(path, mpp, tile_size).read(coords)`` returns the same tiles as ``Slide.read`` for each
level-0 corner, within a few grey levels (see ``README``: the reader's tolerance), much faster:

- tiles are grouped into runs of horizontal neighbours and each run's region is read once, then cut
  in memory (``Slide.read`` makes one ``read_region`` call per tile);
- on JPEG-tiled TIFF pyramids (Aperio SVS, generic TIFF, Hamamatsu NDPI) the JPEG tiles are read
  by file offset and decoded by libjpeg-turbo directly (``jpegtiff``), each tile once per cache
  lifetime, and, when the target is coarser than a stored level by 2x, 4x or 8x, decoded at that
  scale in the DCT domain instead of decoded fully and resized (``dct_scaling``);
- everything else (JPEG 2000 SVS, DICOM, MRXS, flat TIFF, ...) is read through OpenSlide/tiffslide
  (``Slide._read_image``), still one call per run of tiles.

The remaining resize (level px -> target px, e.g. 0.2528 -> 0.25 µm/px) is the reader's antialiased
PIL filter, applied per tile with the same sub-pixel box as ``Slide.read``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from openpluto.slide.jpegtiff import JpegPyramid, best_source, open_jpeg_pyramid
from openpluto.slide.reader import LEVEL_SLACK, RESAMPLE, Slide, SlideError, open_slide

# OpenSlide vendors whose JPEG tiles the raw path decodes (checked pixel by pixel against OpenSlide
# on open, see ``_agrees_with_openslide``).
RAW_VENDORS = ("aperio", "generic-tiff", "hamamatsu")
# Widest region read in one call, in source px (a run of tiles longer than this is split).
MAX_RUN_PX = 8192
# Self-check on open: the raw decode of a level tile must match OpenSlide's within this (grey levels).
CHECK_MEAN, CHECK_MAX = 1.0, 16


@dataclass
class ReaderStats:
    """Seconds spent by a reader: opening, reading + decoding regions, resizing/cutting tiles."""

    open: float = 0.0
    read: float = 0.0
    resize: float = 0.0
    tiles: int = 0

    def add(self, other: ReaderStats) -> None:
        self.open += other.open
        self.read += other.read
        self.resize += other.resize
        self.tiles += other.tiles


@dataclass(frozen=True)
class Source:
    """Where tiles come from: ``kind`` "jpeg" (raw tiles of pyramid level ``level`` decoded at 1/``scale``)
    or "openslide" (level ``level`` through the Slide); ``downsample``: level-0 px per source px."""

    kind: str
    level: int
    scale: int
    downsample: float

    def describe(self) -> str:
        if self.kind == "jpeg":
            return f"raw JPEG level {self.level}" + (f", DCT 1/{self.scale}" if self.scale > 1 else "")
        return f"{self.kind} level {self.level}"


@dataclass
class TileReader:
    """Reads ``tile_size`` px tiles at ``mpp`` µm/px of one slide (see the module docstring).

    ``backend``: "auto" (raw JPEG where the format allows, else OpenSlide) or "openslide".
    ``read(coords)`` -> uint8 [N, T, T, 3] for level-0 top-left corners ``coords`` [N, 2].
    """

    path: str | os.PathLike
    mpp: float
    tile_size: int
    mpp_override: float | None = None
    allow_upsample: bool = False
    backend: str = "auto"
    dct_scaling: bool = True
    stats: ReaderStats = field(default_factory=ReaderStats)

    def __post_init__(self) -> None:
        t0 = time.perf_counter()
        self.path = Path(self.path)
        if self.backend not in ("auto", "openslide"):
            raise ValueError(f"reader backend must be 'auto' or 'openslide', got {self.backend!r}")
        self.slide: Slide = open_slide(self.path, mpp_override=self.mpp_override)
        self.pyramid: JpegPyramid | None = None
        try:
            # level-0 px per output px (raises for a refused upsampling)
            self.target = self.slide._target_downsample(self.mpp, self.allow_upsample)
            self.source = self._choose_source()
        except BaseException:
            self.close()
            raise
        self.stats.open += time.perf_counter() - t0

    # ------------------------------------------------------------------ set-up
    def _choose_source(self) -> Source:
        s = self.slide
        if self.backend == "auto" and s.backend == "openslide" and s.vendor in RAW_VENDORS:
            pyr = open_jpeg_pyramid(s.path, s.dimensions)
            if pyr is not None:
                lv, scale = best_source([lv.downsample for lv in pyr.levels], self.target, LEVEL_SLACK,
                                        self.dct_scaling)
                if self._agrees_with_openslide(pyr, lv):
                    self.pyramid = pyr
                    return Source("jpeg", lv, scale, pyr.levels[lv].downsample * scale)
                pyr.close()
        level = s.best_level(self.target)
        return Source(s.backend, level, 1, s.level_downsamples[level])

    def _agrees_with_openslide(self, pyr: JpegPyramid, lv: int) -> bool:
        """Decode the middle tile of level ``lv`` raw and through the Slide: same pixels (colour space)?"""
        level = pyr.levels[lv]
        match = [i for i, d in enumerate(self.slide.level_dimensions) if d == (level.width, level.height)]
        if not match:
            return False
        tx, ty = level.tiles_across // 2, level.tiles_down // 2
        x, y = tx * level.tile_w, ty * level.tile_h
        w, h = min(level.tile_w, level.width - x), min(level.tile_h, level.height - y)
        try:
            raw = pyr.region(level, 1, x, y, w, h)
            ds = self.slide.level_downsamples[match[0]]
            ref = self.slide.read_level(match[0], round(x * ds), round(y * ds), w, h)
        except Exception:  # noqa: BLE001 - a tile neither can read: let OpenSlide report it later
            return False
        diff = np.abs(raw.astype(np.int16) - ref.astype(np.int16))
        return bool(diff.mean() <= CHECK_MEAN and diff.max() <= CHECK_MAX)

    def close(self) -> None:
        if self.pyramid is not None:
            self.pyramid.close()
            self.pyramid = None
        self.slide.close()

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def _region(self, x: float, y: float, right: float, bottom: float) -> tuple[np.ndarray, float, float]:
        """(RGB uint8 region, its origin x, y) of the source covering source px x..right, y..bottom.

        Raw JPEG regions start on a source pixel; OpenSlide ones at the level-0 pixel nearest (x, y),
        whose position on the level may fall between pixels (OpenSlide renders that offset itself,
        as it does for ``Slide.read``). Outside the slide is white.
        """
        src = self.source
        if src.kind == "jpeg":
            assert self.pyramid is not None
            ox, oy = math.floor(x + 1e-6), math.floor(y + 1e-6)
            w, h = max(1, math.ceil(right - ox - 1e-6)), max(1, math.ceil(bottom - oy - 1e-6))
            return self.pyramid.region(self.pyramid.levels[src.level], src.scale, ox, oy, w, h), ox, oy
        ds = src.downsample
        x0, y0 = round(x * ds), round(y * ds)
        ox, oy = x0 / ds, y0 / ds
        w, h = max(1, math.ceil(right - ox - 1e-6)), max(1, math.ceil(bottom - oy - 1e-6))
        return self.slide.read_level(src.level, x0, y0, w, h), ox, oy

    def read(self, coords: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 [N, T, T, 3]: the tile whose level-0 top-left is each row of ``coords`` [N, 2].

        ``out`` (uint8 [>= N, T, T, 3]) receives the tiles when given. Errors are SlideError naming
        the file.
        """
        coords = np.asarray(coords, np.float64).reshape(-1, 2)
        t = self.tile_size
        if out is None:
            out = np.empty((len(coords), t, t, 3), np.uint8)
        ds = self.source.downsample
        span = t * self.target / ds  # source px per tile side
        try:
            for run in _runs(coords, ds, span):
                self._read_run(coords, run, ds, span, out)
        except SlideError:
            raise
        except Exception as e:
            raise SlideError(f"{self.path}: reading tiles failed ({self.source.describe()}): "
                             f"{' '.join(str(e).split()) or type(e).__name__}") from None
        self.stats.tiles += len(coords)
        return out[:len(coords)]

    def _read_run(self, coords: np.ndarray, run: list[int], ds: float, span: float, out: np.ndarray) -> None:
        t = self.tile_size
        sx = coords[run, 0] / ds
        sy = coords[run, 1] / ds
        t0 = time.perf_counter()
        region, x0, y0 = self._region(sx.min(), sy.min(), sx.max() + span, sy.max() + span)
        t1 = time.perf_counter()
        exact = abs(span - t) < 1e-6
        for k, i in enumerate(run):
            fx, fy = sx[k] - x0, sy[k] - y0
            ix, iy = round(fx), round(fy)
            if exact and abs(fx - ix) < 1e-6 and abs(fy - iy) < 1e-6:
                out[i] = region[iy:iy + t, ix:ix + t]
                continue
            cx, cy = math.floor(fx + 1e-6), math.floor(fy + 1e-6)
            cw, ch = math.ceil(fx + span - 1e-6) - cx, math.ceil(fy + span - 1e-6) - cy
            crop = Image.fromarray(region[cy:cy + ch, cx:cx + cw])
            box = (fx - cx, fy - cy, fx - cx + span, fy - cy + span)
            out[i] = np.asarray(crop.resize((t, t), RESAMPLE, box=box))
        self.stats.read += t1 - t0
        self.stats.resize += time.perf_counter() - t1


def _runs(coords: np.ndarray, ds: float, span: float) -> list[list[int]]:
    """Indices of ``coords`` grouped into runs: same row (level-0 y), horizontal neighbours, <= MAX_RUN_PX."""
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    runs: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur:
            j = cur[-1]
            same_row = coords[i, 1] == coords[j, 1]
            near = (coords[i, 0] - coords[j, 0]) / ds <= 1.5 * span
            short = (coords[i, 0] - coords[cur[0], 0]) / ds + span <= MAX_RUN_PX
            if not (same_row and near and short):
                runs.append(cur)
                cur = []
        cur.append(int(i))
    if cur:
        runs.append(cur)
    return runs


def block_order(coords: np.ndarray, tile_l0: float, block: int = 8) -> np.ndarray:
    """Permutation putting tile corners in blocks of ``block`` x ``block`` grid cells (row-major inside).

    Consecutive tiles then share source tiles, so a reader that gets them together decodes each
    JPEG tile about once. ``tile_l0``: the grid step in level-0 px.
    """
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    if len(coords) == 0:
        return np.zeros(0, np.int64)
    gx = np.floor(coords[:, 0] / tile_l0 + 1e-6).astype(np.int64)
    gy = np.floor(coords[:, 1] / tile_l0 + 1e-6).astype(np.int64)
    return np.lexsort((gx, gy, gx // block, gy // block)).astype(np.int64)

"""Tissue mask from a low-resolution thumbnail, minus artifacts; tile grids over the usable mask.

Bright-field slides: optical density relative to the estimated background (Otsu, clamped to a range
so that faint tissue and mostly-tissue slides both work) or colour saturation. Dark-background
(fluorescence) slides are detected from the border and thresholded on smoothed signal instead,
because Otsu on saturation marks the whole slide as tissue there.

Each slide's modality is recorded: ``fluorescence`` (dark background) or ``brightfield``, and for
bright-field slides the stain, ``ihc`` when a share of the stained tissue is DAB brown, else ``he``
(a DAB-negative IHC slide, haematoxylin only, is indistinguishable from H&E here).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from openpluto.slide.artifacts import detect_artifacts, smooth
from openpluto.slide.config import TissueConfig
from openpluto.slide.reader import Slide

# Bright-field slides with at least this DAB-brown share of stained tissue are IHC (H&E sets: <= 0.03).
IHC_MIN_DAB_FRACTION = 0.10
# What `tiles --modality` accepts: a modality, a bright-field stain, or any.
MODALITY_CHOICES = ("brightfield", "he", "ihc", "fluorescence", "any")

# µm/px assumed for level 0 when a slide has no mpp (only used to size morphology on such slides).
_ASSUMED_MPP = 0.5


@dataclasses.dataclass
class TissueResult:
    """Masks of one slide at thumbnail resolution.

    ``thumbnail`` RGB uint8 [h, w, 3]; ``downsample``: level-0 px per mask px; ``tissue``,
    ``usable`` and each ``artifacts[name]`` (pen, blur, fold): bool [h, w]; ``mask_mpp``: µm per
    mask px (None if the slide has no mpp); ``dark_background``: fluorescence-like slide;
    ``stain``: ``he`` or ``ihc`` for bright-field slides (None for fluorescence) and ``dab_fraction``,
    the DAB-brown share of the stained tissue pixels it was decided by.
    """

    thumbnail: np.ndarray
    downsample: float
    tissue: np.ndarray
    artifacts: dict[str, np.ndarray]
    usable: np.ndarray
    mask_mpp: float | None = None
    dark_background: bool = False
    stain: str | None = None
    dab_fraction: float | None = None

    @property
    def modality(self) -> str:
        """``fluorescence`` (dark background) or ``brightfield``."""
        return "fluorescence" if self.dark_background else "brightfield"

    def matches_modality(self, wanted: str) -> bool:
        """Whether this slide is of ``wanted``: one of :data:`MODALITY_CHOICES`."""
        return wanted == "any" or wanted in (self.modality, self.stain)

    def _integral(self) -> np.ndarray:
        ii = getattr(self, "_ii", None)
        if ii is None:
            ii = np.zeros((self.usable.shape[0] + 1, self.usable.shape[1] + 1), np.float64)
            ii[1:, 1:] = np.cumsum(np.cumsum(self.usable, 0, dtype=np.float64), 1)
            self._ii = ii
        return ii

    def usable_fraction(self, xs: np.ndarray, ys: np.ndarray, size_l0: float) -> np.ndarray:
        """Usable-tissue fraction of level-0 boxes (xs, ys, size_l0 x size_l0); float [N]."""
        ii = self._integral()
        h, w = self.usable.shape
        ds = self.downsample
        x0 = np.clip(np.round(np.asarray(xs) / ds), 0, w).astype(np.int64)
        y0 = np.clip(np.round(np.asarray(ys) / ds), 0, h).astype(np.int64)
        x1 = np.clip(np.maximum(x0 + 1, np.round((np.asarray(xs) + size_l0) / ds)), 0, w).astype(np.int64)
        y1 = np.clip(np.maximum(y0 + 1, np.round((np.asarray(ys) + size_l0) / ds)), 0, h).astype(np.int64)
        area = np.maximum(1, (x1 - x0) * (y1 - y0))
        s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        return s / area

    def area_mm2(self, mask: np.ndarray | None = None) -> float | None:
        if self.mask_mpp is None:
            return None
        m = self.tissue if mask is None else mask
        return float(m.sum()) * (self.mask_mpp / 1000.0) ** 2


def _disk(r: int) -> np.ndarray:
    r = max(1, int(r))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    holes = ndi.binary_fill_holes(mask) & ~mask
    if not holes.any():
        return mask
    lab, n = ndi.label(holes)
    sizes = np.bincount(lab.ravel())
    fill = sizes <= max_px
    fill[0] = False
    return mask | fill[lab]


def is_dark_background(rgb: np.ndarray) -> bool:
    """True when the slide border is dark (fluorescence), judged from a 5 % frame of the thumbnail."""
    h, w = rgb.shape[:2]
    b = max(1, int(0.05 * min(h, w)))
    frame = np.concatenate(
        [
            rgb[:b].reshape(-1, 3),
            rgb[-b:].reshape(-1, 3),
            rgb[:, :b].reshape(-1, 3),
            rgb[:, -b:].reshape(-1, 3),
        ]
    )
    return float(np.median(frame.max(axis=1))) < 80.0


def dab_fraction(rgb: np.ndarray, tissue: np.ndarray, max_pixels: int = 200_000) -> float:
    """Share of the stained tissue pixels (saturation > 0.12) whose hue is DAB brown (15°-60°).

    H&E tissue is pink to purple (hue 200°-15°, through magenta): the LC25000, CRC and Kather H&E sets
    and the H&E test slides give 0.00-0.03, while DAB-positive IHC tissue is brown where the antigen
    is. At most ``max_pixels`` tissue pixels are looked at (an even subsample).
    """
    px = rgb[tissue]
    if len(px) > max_pixels:
        px = px[:: -(-len(px) // max_pixels)]
    px = px.astype(np.float32)
    mx, mn = px.max(1), px.min(1)
    sat = (mx - mn) / np.maximum(mx, 1.0)
    stained = px[sat > 0.12]
    if len(stained) == 0:
        return 0.0
    r, g, b = stained[:, 0], stained[:, 1], stained[:, 2]
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0  # hexcone hue, approx.
    return float(np.mean((hue >= 15.0) & (hue <= 60.0)))


def optical_density(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel optical density relative to the bright background: (od [h,w,3], background RGB)."""
    flat = rgb.reshape(-1, 3).astype(np.float32)
    bright = flat[flat.sum(1) >= np.percentile(flat.sum(1), 95)]
    bg = np.clip(np.median(bright, axis=0), 180.0, 255.0)
    od = -np.log10(np.clip((rgb.astype(np.float32) + 1.0) / (bg + 1.0), 1e-3, 1.0))
    return od, bg


def _otsu(values: np.ndarray, default: float) -> float:
    values = values[np.isfinite(values)]
    if values.size < 16 or values.max() - values.min() < 1e-6:
        return default
    return float(threshold_otsu(values))


def _bright_tissue(rgb: np.ndarray, cfg: TissueConfig, px_um: float) -> np.ndarray:
    od, _ = optical_density(rgb)
    od_sum = ndi.gaussian_filter(od.sum(axis=2), 1.0)
    mx, mn = rgb.max(axis=2).astype(np.float32), rgb.min(axis=2).astype(np.float32)
    sat = ndi.gaussian_filter((mx - mn) / np.maximum(mx, 1.0), 1.0)
    sub = od_sum[:: max(1, od_sum.shape[0] // 512), :: max(1, od_sum.shape[1] // 512)].ravel()
    thr = min(max(_otsu(sub, cfg.min_od), cfg.min_od), cfg.max_od)
    return (od_sum > thr) | ((sat > max(cfg.min_saturation, 0.0)) & (od_sum > cfg.min_od / 2))


def _dark_tissue(rgb: np.ndarray, cfg: TissueConfig, px_um: float) -> np.ndarray:
    """Fluorescence: tissue is where smoothed (30 µm) log signal rises well above the dark glass."""
    sig = np.log1p(rgb.max(axis=2).astype(np.float32))
    sig = smooth(sig, max(1.0, 30.0 / px_um))
    sub = sig[:: max(1, sig.shape[0] // 512), :: max(1, sig.shape[1] // 512)].ravel()
    floor = float(np.percentile(sub, 2))
    return sig > floor + 0.4 * (_otsu(sub, float(np.log1p(20.0))) - floor)


def detect_tissue(slide: Slide, cfg: TissueConfig | None = None) -> TissueResult:
    """Tissue, artifact and usable masks of ``slide`` from a thumbnail at about ``cfg.mask_mpp`` µm/px."""
    cfg = cfg or TissueConfig()
    w0, h0 = slide.dimensions
    base_mpp = slide.mpp or _ASSUMED_MPP
    ds = max(1.0, cfg.mask_mpp / base_mpp, max(w0, h0) / cfg.max_mask_size)
    rgb, ds = slide.thumbnail(downsample=ds)
    px_um = base_mpp * ds
    return detect_tissue_rgb(rgb, ds, px_um, cfg, mask_mpp=(slide.mpp * ds) if slide.mpp else None)


def detect_tissue_rgb(
    rgb: np.ndarray,
    downsample: float,
    px_um: float,
    cfg: TissueConfig | None = None,
    mask_mpp: float | None = None,
) -> TissueResult:
    """``detect_tissue`` on a given thumbnail (``px_um``: µm per thumbnail px)."""
    cfg = cfg or TissueConfig()
    dark = is_dark_background(rgb) if cfg.background == "auto" else cfg.background == "dark"
    raw = _dark_tissue(rgb, cfg, px_um) if dark else _bright_tissue(rgb, cfg, px_um)
    area_px = 1.0 / (px_um * px_um)  # px per µm²
    tissue = ndi.binary_closing(raw, _disk(math.ceil(cfg.close_um / px_um)), border_value=0) | raw
    tissue = _fill_small_holes(tissue, cfg.max_hole_um2 * area_px)
    tissue = ndi.binary_opening(tissue, _disk(1)) if min(tissue.shape) > 32 else tissue
    tissue = _remove_small(tissue, cfg.min_region_um2 * area_px)
    artifacts = detect_artifacts(rgb, tissue, px_um, cfg, dark=dark)
    pen = artifacts.get("pen")
    if pen is not None:
        tissue = tissue & ~(pen & ~_under_pen_is_tissue(tissue, pen))
    bad = np.zeros_like(tissue)
    for m in artifacts.values():
        bad |= m
    usable = tissue & ~bad
    dab = None if dark else dab_fraction(rgb, tissue)
    stain = None if dab is None else ("ihc" if dab >= IHC_MIN_DAB_FRACTION else "he")
    return TissueResult(
        thumbnail=rgb,
        downsample=float(downsample),
        tissue=tissue,
        artifacts=artifacts,
        usable=usable,
        mask_mpp=mask_mpp,
        dark_background=dark,
        stain=stain,
        dab_fraction=dab,
    )


def _under_pen_is_tissue(tissue: np.ndarray, pen: np.ndarray) -> np.ndarray:
    """Pen pixels take the tissue state of the nearest pixel without ink (ink on tissue vs on glass)."""
    if not pen.any() or pen.all():
        return np.zeros_like(pen)
    _, (iy, ix) = ndi.distance_transform_edt(pen, return_indices=True)
    return pen & tissue[iy, ix]


def grid_tiles(
    slide: Slide,
    result: TissueResult,
    mpp: float,
    tile_size: int,
    min_tissue: float = 0.5,
    overlap: float = 0.0,
) -> np.ndarray:
    """Tiles of ``tile_size`` px at ``mpp`` on a regular grid over the usable mask.

    Returns float64 [N, 3]: level-0 x, y of each tile's top-left and its usable-tissue fraction;
    tiles with fraction < ``min_tissue`` are dropped.
    """
    size_l0 = tile_size * mpp / slide.require_mpp()
    step = max(1.0, size_l0 * (1.0 - overlap))
    w0, h0 = slide.dimensions
    if size_l0 > w0 or size_l0 > h0:
        return np.zeros((0, 3), np.float64)
    xs = np.arange(0.0, w0 - size_l0 + 1e-6, step)
    ys = np.arange(0.0, h0 - size_l0 + 1e-6, step)
    gx, gy = np.meshgrid(np.round(xs), np.round(ys))
    gx, gy = gx.ravel(), gy.ravel()
    frac = result.usable_fraction(gx, gy, size_l0)
    keep = frac >= min_tissue if min_tissue > 0 else frac > 0
    return np.stack([gx[keep], gy[keep], frac[keep]], axis=1).astype(np.float64)

"""Synthetic H&E-like whole-slide images with known tissue classes and artifacts, plus ground truth.

Tissue classes differ mainly in morphology (nuclear density, size, shape and arrangement; fibres;
vacuoles; glands; debris) while their colours overlap and the stain varies per slide, so colour
statistics alone do not separate them. Textures are rendered in µm units at a reduced resolution
(1 µm/px for slides) and upsampled, which keeps a 4k x 4k slide to a couple of seconds.

Files: ``<slide>.tiff`` (pyramidal tiled TIFF with resolution tags, opened by OpenSlide's
generic-tiff reader with the right µm/px) and ``<slide>.truth.npz`` beside it (class map and
artifact masks at ``downsample`` level-0 px per truth px).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

TISSUE_CLASSES: tuple[str, ...] = ("tumour", "stroma", "lymphocytes", "adipose", "mucosa", "necrosis")
ARTIFACT_CLASSES: tuple[str, ...] = ("pen", "blur", "fold")

# Stain optical-density vectors (RGB, base 10); jittered per slide.
_H_VEC = np.array([0.65, 0.70, 0.29], np.float32)
_E_VEC = np.array([0.07, 0.99, 0.11], np.float32)
_INKS = {
    "blue": np.array([0.95, 0.55, 0.08], np.float32),
    "green": np.array([0.85, 0.18, 0.75], np.float32),
    "black": np.array([1.3, 1.3, 1.25], np.float32),
    "red": np.array([0.08, 0.95, 0.85], np.float32),
}


# ----------------------------------------------------------------------------- ground truth


@dataclasses.dataclass
class SyntheticTruth:
    """Ground truth of one synthetic slide.

    ``class_map`` int8 [h, w]: index into ``classes`` or -1 for background; ``pen``, ``blur``,
    ``fold`` bool [h, w]; each truth pixel covers ``downsample`` level-0 px per side.
    """

    path: Path
    classes: tuple[str, ...]
    downsample: float
    mpp: float
    dimensions: tuple[int, int]
    class_map: np.ndarray
    pen: np.ndarray
    blur: np.ndarray
    fold: np.ndarray

    @property
    def tissue(self) -> np.ndarray:
        """Tissue (any class), including tissue under artifacts; bool [h, w]."""
        return self.class_map >= 0

    @property
    def artifacts(self) -> np.ndarray:
        return self.pen | self.blur | self.fold

    @property
    def usable(self) -> np.ndarray:
        """Tissue free of pen, blur and folds; bool [h, w]."""
        return self.tissue & ~self.artifacts

    def labels(self) -> np.ndarray:
        """Class map with artifacts set to -1."""
        lab = self.class_map.astype(np.int16).copy()
        lab[self.artifacts] = -1
        return lab

    def box(self, x: float, y: float, size_l0: float) -> tuple[slice, slice]:
        t = self.downsample
        x0, y0 = int(math.floor(x / t)), int(math.floor(y / t))
        x1 = max(x0 + 1, int(math.ceil((x + size_l0) / t)))
        y1 = max(y0 + 1, int(math.ceil((y + size_l0) / t)))
        return slice(max(0, y0), y1), slice(max(0, x0), x1)

    def label_at(self, x: float, y: float, size_l0: float) -> int:
        """Majority label of the level-0 box (x, y, size_l0): a class index, or -1 for background/artifact."""
        sy, sx = self.box(x, y, size_l0)
        lab = self.labels()[sy, sx]
        if lab.size == 0:
            return -1
        counts = np.bincount((lab.ravel() + 1).astype(np.int64), minlength=len(self.classes) + 1)
        return int(np.argmax(counts)) - 1

    def usable_fraction(self, x: float, y: float, size_l0: float) -> float:
        """Fraction of the level-0 box that is usable tissue."""
        sy, sx = self.box(x, y, size_l0)
        u = self.usable[sy, sx]
        return float(u.mean()) if u.size else 0.0


def truth_path(slide_path: str | os.PathLike) -> Path:
    p = Path(slide_path)
    return p.with_name(p.name.split(".")[0] + ".truth.npz")


def load_truth(slide_path: str | os.PathLike) -> SyntheticTruth:
    """Ground truth saved beside a synthetic slide by ``make_synthetic_slide``."""
    p = truth_path(slide_path)
    if not p.is_file():
        from openpluto.slide.reader import SlideError

        raise SlideError(f"{slide_path}: no ground truth {p.name} beside it (not a synthetic slide?)")
    with np.load(p, allow_pickle=False) as z:
        return SyntheticTruth(
            path=Path(slide_path),
            classes=tuple(str(c) for c in z["classes"]),
            downsample=float(z["downsample"]),
            mpp=float(z["mpp"]),
            dimensions=(int(z["dimensions"][0]), int(z["dimensions"][1])),
            class_map=z["class_map"].astype(np.int8),
            pen=z["pen"].astype(bool),
            blur=z["blur"].astype(bool),
            fold=z["fold"].astype(bool),
        )


# ----------------------------------------------------------------------------- noise helpers


def _smooth_noise(h: int, w: int, scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise [h, w] with features of about ``scale_px`` pixels."""
    s = max(1.0, scale_px)
    gh, gw = max(2, int(math.ceil(h / s)) + 2), max(2, int(math.ceil(w / s)) + 2)
    low = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(low).resize((int(gw * s), int(gh * s)), Image.Resampling.BICUBIC)
    out = np.asarray(img)[:h, :w]
    return out / (out.std() + 1e-6)


def _worley(h: int, w: int, cell: float, rng: np.random.Generator, jitter: float = 0.8):
    """Jittered-grid Worley noise: (F1, F2 distances in px, id of the nearest seed, seed offset dy, dx)."""
    cell = max(2.0, cell)
    gh, gw = int(math.ceil(h / cell)) + 2, int(math.ceil(w / cell)) + 2
    sy = (np.arange(gh)[:, None] - 0.5 + jitter * (rng.random((gh, gw)) - 0.5)) * cell
    sx = (np.arange(gw)[None, :] - 0.5 + jitter * (rng.random((gh, gw)) - 0.5)) * cell
    sy, sx = sy.astype(np.float32), sx.astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    ci = (yy[:, 0] // cell).astype(np.int32) + 1
    cj = (xx[0] // cell).astype(np.int32) + 1
    f1 = np.full((h, w), np.inf, np.float32)
    f2 = np.full((h, w), np.inf, np.float32)
    ids = np.zeros((h, w), np.int32)
    dy1 = np.zeros((h, w), np.float32)
    dx1 = np.zeros((h, w), np.float32)
    for di in (-1, 0, 1):
        ii = np.clip(ci + di, 0, gh - 1)
        for dj in (-1, 0, 1):
            jj = np.clip(cj + dj, 0, gw - 1)
            dy = yy - sy[ii[:, None], jj[None, :]]
            dx = xx - sx[ii[:, None], jj[None, :]]
            d = dy * dy + dx * dx  # squared distance
            closer = d < f1
            np.copyto(f2, np.minimum(f2, d))
            np.copyto(f2, f1, where=closer)
            np.copyto(f1, d, where=closer)
            np.copyto(ids, ii[:, None] * gw + jj[None, :], where=closer)
            np.copyto(dy1, dy, where=closer)
            np.copyto(dx1, dx, where=closer)
    return np.sqrt(f1), np.sqrt(f2), ids, dy1, dx1


def _ellipse_sprite(a: float, b: float, angle: float) -> np.ndarray:
    """Soft filled ellipse [k, k] in 0..1 with semi-axes a, b px rotated by ``angle`` rad."""
    r = int(math.ceil(max(a, b))) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (xx * c + yy * s) / max(a, 0.5), (-xx * s + yy * c) / max(b, 0.5)
    d = np.sqrt(u * u + v * v)
    return np.clip((1.0 - d) * max(a, b) + 0.5, 0.0, 1.0)


def _stamp(
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    values: np.ndarray,
    a_rng: tuple[float, float],
    ratio_rng: tuple[float, float],
    rng: np.random.Generator,
    angles: np.ndarray | None = None,
    variants: int = 8,
) -> None:
    """Max-composite soft ellipses (nuclei) at integer (ys, xs) into ``canvas`` in place."""
    if len(ys) == 0:
        return
    h, w = canvas.shape
    group = rng.integers(0, variants, len(ys))
    for g in range(variants):
        sel = group == g
        if not sel.any():
            continue
        a = rng.uniform(*a_rng)
        b = a * rng.uniform(*ratio_rng)
        ang = float(np.median(angles[sel])) if angles is not None else rng.uniform(0, math.pi)
        spr = _ellipse_sprite(a, b, ang)
        k = spr.shape[0] // 2
        oy, ox = np.nonzero(spr > 0.02)
        wts = spr[oy, ox]
        py = ys[sel][:, None] + (oy - k)[None, :]
        px = xs[sel][:, None] + (ox - k)[None, :]
        ok = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        vals = values[sel][:, None] * wts[None, :]
        flat = (py * w + px)[ok]
        v = vals[ok]
        cur = canvas.ravel()
        cur[flat] = np.maximum(cur[flat], v)


def _jittered_points(
    h: int, w: int, spacing: float, rng: np.random.Generator, jitter: float = 0.9, keep: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    gy, gx = np.mgrid[0:h:spacing, 0:w:spacing]
    ys = gy.ravel() + rng.uniform(-jitter / 2, jitter / 2, gy.size) * spacing
    xs = gx.ravel() + rng.uniform(-jitter / 2, jitter / 2, gx.size) * spacing
    sel = rng.random(ys.size) < keep
    return np.clip(ys[sel], 0, h - 1).astype(np.int64), np.clip(xs[sel], 0, w - 1).astype(np.int64)


def _poisson_points(
    h: int, w: int, per_px2: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    n = rng.poisson(per_px2 * h * w)
    return rng.integers(0, h, n), rng.integers(0, w, n)


# ----------------------------------------------------------------------------- class textures


def render_class(
    name: str, h: int, w: int, r: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin optical densities (float32 [h, w] each) of tissue class ``name``.

    ``r`` is the rendering resolution in µm/px; all morphology is specified in µm.
    """
    H = np.zeros((h, w), np.float32)
    u = 1.0 / r  # px per µm
    e_base = rng.uniform(0.22, 0.42)
    if name == "tumour":
        E = e_base + 0.06 * _smooth_noise(h, w, 20 * u, rng)
        ys, xs = _jittered_points(h, w, 11 * u, rng, keep=0.92)
        _stamp(
            H,
            ys,
            xs,
            rng.uniform(0.55, 1.0, len(ys)).astype(np.float32),
            (3.2 * u, 6.0 * u),
            (0.55, 1.0),
            rng,
            variants=12,
        )
        H *= 0.8 + 0.2 * np.clip(_smooth_noise(h, w, 1.2 * u, rng), -2, 2) / 2
    elif name == "stroma":
        theta = rng.uniform(0, math.pi) + 0.5 * _smooth_noise(h, w, 60 * u, rng)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / (5.0 * u) * 2 * math.pi
        fib = 0.5 + 0.5 * np.sin(phase + 2.0 * _smooth_noise(h, w, 8 * u, rng))
        E = e_base * (0.55 + 0.75 * fib**2) + 0.03 * _smooth_noise(h, w, 15 * u, rng)
        ys, xs = _poisson_points(h, w, 1.0 / (38 * u) ** 2, rng)
        ang = theta[ys, xs] + math.pi / 2 if len(ys) else None
        # Spindle nuclei aligned with the fibres (sprite angle = fibre direction).
        _stamp(
            H,
            ys,
            xs,
            rng.uniform(0.5, 0.85, len(ys)).astype(np.float32),
            (5.0 * u, 7.5 * u),
            (0.18, 0.3),
            rng,
            angles=None if ang is None else ang - math.pi / 2,
        )
    elif name == "lymphocytes":
        E = 0.5 * e_base + 0.04 * _smooth_noise(h, w, 20 * u, rng)
        ys, xs = _jittered_points(h, w, 7.5 * u, rng, keep=0.9)
        _stamp(
            H,
            ys,
            xs,
            rng.uniform(0.85, 1.15, len(ys)).astype(np.float32),
            (2.6 * u, 3.4 * u),
            (0.85, 1.0),
            rng,
        )
    elif name == "adipose":
        f1, f2, _, _, _ = _worley(h, w, rng.uniform(55, 80) * u, rng)
        membrane = np.clip(1.0 - (f2 - f1) / (2.2 * u), 0.0, 1.0)
        E = 0.03 + (e_base + 0.15) * membrane
        ys, xs = _poisson_points(h, w, 1.0 / (120 * u) ** 2, rng)
        _stamp(H, ys, xs, np.full(len(ys), 0.6, np.float32), (4.0 * u, 5.0 * u), (0.3, 0.45), rng)
        H *= membrane > 0.3
    elif name == "mucosa":
        f1, _, ids, dy, dx = _worley(h, w, rng.uniform(80, 110) * u, rng)
        r_lumen = rng.uniform(12, 20) * u
        epi = (f1 > r_lumen) & (f1 < r_lumen + 16 * u)
        lumen = f1 <= r_lumen
        E = np.where(lumen, 0.04, np.where(epi, e_base * 1.1, 0.6 * e_base)).astype(np.float32)
        E += 0.03 * _smooth_noise(h, w, 10 * u, rng)
        # Columnar nuclei: a ring of elongated nuclei near the basal side of the epithelium.
        ring = np.abs(f1 - (r_lumen + 11 * u)) < 0.6 * u
        ry, rx = np.nonzero(ring)
        sel = rng.random(len(ry)) < (1.0 / (5.0 * u))
        ry, rx = ry[sel], rx[sel]
        radial = np.arctan2(dy[ry, rx], dx[ry, rx])
        for lo in np.linspace(-math.pi, math.pi, 9)[:-1]:
            m = (radial >= lo) & (radial < lo + math.pi / 4)
            _stamp(
                H,
                ry[m],
                rx[m],
                rng.uniform(0.6, 0.9, int(m.sum())).astype(np.float32),
                (4.0 * u, 5.0 * u),
                (0.3, 0.4),
                rng,
                angles=radial[m],
                variants=1,
            )
        lp = ~(epi | lumen)
        ys, xs = _poisson_points(h, w, 1.0 / (16 * u) ** 2, rng)
        keep = lp[ys, xs]
        _stamp(
            H,
            ys[keep],
            xs[keep],
            rng.uniform(0.6, 1.0, int(keep.sum())).astype(np.float32),
            (2.5 * u, 3.2 * u),
            (0.8, 1.0),
            rng,
        )
    elif name == "necrosis":
        E = e_base * (0.9 + 0.25 * _smooth_noise(h, w, 25 * u, rng)) + 0.05 * _smooth_noise(h, w, 3 * u, rng)
        ys, xs = _poisson_points(h, w, 1.0 / (8.5 * u) ** 2, rng)
        _stamp(
            H,
            ys,
            xs,
            rng.uniform(0.35, 0.85, len(ys)).astype(np.float32),
            (0.8 * u, 1.8 * u),
            (0.4, 1.0),
            rng,
            variants=10,
        )
        # Ghost cells: faint empty rings.
        f1, _, _, _, _ = _worley(h, w, 12 * u, rng)
        E = E * (1.0 - 0.25 * np.clip(1.0 - np.abs(f1 - 4.5 * u) / (1.0 * u), 0, 1))
        H = ndi.gaussian_filter(H, 0.4 * u)
    else:
        raise ValueError(f"unknown tissue class {name!r} (known: {', '.join(TISSUE_CLASSES)})")
    return H.astype(np.float32), np.clip(E, 0.0, None).astype(np.float32)


def _stain(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-slide stain: jittered H and E vectors and their strengths."""
    hv = _H_VEC * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    ev = _E_VEC * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    return hv, ev, float(rng.uniform(0.75, 1.25)), float(rng.uniform(0.7, 1.3))


def _to_rgb(
    H: np.ndarray,
    E: np.ndarray,
    stain,
    rng: np.random.Generator,
    extra_od: np.ndarray | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:
    hv, ev, hs, es = stain
    od = (H * hs)[..., None] * hv + (E * es)[..., None] * ev
    if extra_od is not None:
        od = od + extra_od
    if background is not None:
        od = od + background
    od += rng.normal(0, 0.012, od.shape[:2])[..., None].astype(np.float32)
    return np.clip(255.0 * np.power(10.0, -od), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- slides


def _upsample(a: np.ndarray, w: int, h: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((w, h), resample))


def _stroke_mask(w: int, h: int, width: float, rng: np.random.Generator, n_strokes: int) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(n_strokes):
        p = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        ang = rng.uniform(0, 2 * math.pi)
        pts = [tuple(p)]
        for _ in range(12):
            ang += rng.normal(0, 0.35)
            p = p + np.array([math.cos(ang), math.sin(ang)]) * max(w, h) / 22
            pts.append(tuple(p))
        draw.line(pts, fill=255, width=max(1, int(width)), joint="curve")
    return np.asarray(img) > 127


def make_synthetic_slide(
    path: str | os.PathLike,
    size: int | tuple[int, int] = 4096,
    mpp: float = 0.5,
    seed: int = 0,
    classes: tuple[str, ...] = TISSUE_CLASSES,
    pen: bool = True,
    blur: bool = True,
    fold: bool = True,
    compression: str = "jpeg",
    tile: int = 256,
    n_regions: int | None = None,
) -> SyntheticTruth:
    """Write a pyramidal tiled TIFF H&E-like slide (``size`` level-0 px at ``mpp`` µm/px) and its truth.

    The slide has tissue of ``classes`` in Voronoi-like regions, white background, and (optionally)
    pen strokes (blue/green/black/red ink), a blurred area and a fold. Ground truth is saved as
    ``<stem>.truth.npz`` beside it and returned.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    W, Hh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    render_mpp = max(mpp, 1.0)  # render textures at <= 1 µm/px resolution, then upsample
    f = render_mpp / mpp
    rw, rh = max(16, int(round(W / f))), max(16, int(round(Hh / f)))
    t = max(1, int(round(max(W, Hh) / 512)))  # truth downsample (level-0 px per truth px)
    tw, th = int(math.ceil(W / t)), int(math.ceil(Hh / t))

    # --- layout fields on the truth grid (continuous, upsampled to render res) -----------------
    yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
    cy, cx = th / 2, tw / 2
    radial = np.sqrt(((yy - cy) / (0.42 * th)) ** 2 + ((xx - cx) / (0.42 * tw)) ** 2)
    tissue_field = 1.0 - radial + 0.22 * _smooth_noise(th, tw, max(th, tw) / 6, rng)
    # Voronoi regions of classes, with warped borders.
    n_regions = n_regions or max(len(classes) + 2, 10)
    seeds = np.stack([rng.uniform(0.15, 0.85, n_regions) * th, rng.uniform(0.15, 0.85, n_regions) * tw], 1)
    labels = np.array([i % len(classes) for i in range(n_regions)])
    rng.shuffle(labels)
    wy = yy + 0.06 * th * _smooth_noise(th, tw, max(th, tw) / 8, rng)
    wx = xx + 0.06 * tw * _smooth_noise(th, tw, max(th, tw) / 8, rng)
    d = (wy[..., None] - seeds[:, 0]) ** 2 + (wx[..., None] - seeds[:, 1]) ** 2
    region_t = labels[np.argmin(d, axis=-1)].astype(np.int8)
    tissue_t = tissue_field > 0
    class_map = np.where(tissue_t, region_t, -1).astype(np.int8)

    pen_t = np.zeros((th, tw), bool)
    blur_t = np.zeros((th, tw), bool)
    fold_t = np.zeros((th, tw), bool)
    pen_color: dict[str, np.ndarray] = {}
    if blur:
        by, bx = rng.uniform(0.35, 0.65) * th, rng.uniform(0.3, 0.7) * tw
        br = rng.uniform(0.09, 0.13) * max(th, tw)
        blur_field = 1.0 - np.sqrt(((yy - by) / br) ** 2 + ((xx - bx) / (1.3 * br)) ** 2)
        blur_t = (blur_field > 0) & tissue_t
    if fold:
        ang = rng.uniform(0, math.pi)
        oy, ox = rng.uniform(0.35, 0.65) * th, rng.uniform(0.35, 0.65) * tw
        dist = np.abs((yy - oy) * math.cos(ang) - (xx - ox) * math.sin(ang))
        along = np.abs((yy - oy) * math.sin(ang) + (xx - ox) * math.cos(ang))
        fw = rng.uniform(0.02, 0.035) * max(th, tw)
        fold_t = (dist < fw) & (along < 0.3 * max(th, tw)) & tissue_t & ~blur_t
    if pen:
        inks = list(_INKS)
        rng.shuffle(inks)
        for ink in inks[: int(rng.integers(2, 4))]:
            m = _stroke_mask(tw, th, rng.uniform(0.012, 0.02) * max(tw, th), rng, 1)
            pen_color[ink] = m
            pen_t |= m

    # --- render textures at render resolution ------------------------------------------------------
    stain = _stain(rng)
    Hd = np.zeros((rh, rw), np.float32)
    Ed = np.zeros((rh, rw), np.float32)
    reg_r = (
        np.asarray(
            Image.fromarray((class_map.astype(np.int16) + 1).astype(np.uint8)).resize(
                (rw, rh), Image.Resampling.NEAREST
            )
        ).astype(np.int16)
        - 1
    )
    tissue_r = _upsample(tissue_field, rw, rh) > 0
    for ci, name in enumerate(classes):
        m = (reg_r == ci) & tissue_r
        if not m.any():
            continue
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
        h_c, e_c = render_class(name, y1 - y0, x1 - x0, render_mpp, rng)
        mm = m[y0:y1, x0:x1]
        Hd[y0:y1, x0:x1][mm] = h_c[mm]
        Ed[y0:y1, x0:x1][mm] = e_c[mm]
    # Soft tissue edge.
    edge = np.clip(_upsample(tissue_field, rw, rh) / 0.01, 0, 1).astype(np.float32)
    Hd *= edge
    Ed *= edge
    if fold:
        fr = _upsample(fold_t.astype(np.float32), rw, rh) > 0.5
        Hd[fr] = Hd[fr] * 1.8 + 0.35
        Ed[fr] = Ed[fr] * 2.0 + 0.35
    extra = None
    if pen:
        extra = np.zeros((rh, rw, 3), np.float32)
        for ink, m in pen_color.items():
            mr = ndi.gaussian_filter(_upsample(m.astype(np.float32), rw, rh), 1.0)
            extra += mr[..., None] * _INKS[ink] * rng.uniform(0.8, 1.1)
    bg = np.array(rng.uniform(0.01, 0.04, 3), np.float32)
    rgb = _to_rgb(Hd, Ed, stain, rng, extra_od=None, background=bg)
    if blur:
        br_r = _upsample(blur_t.astype(np.float32), rw, rh) > 0.5
        ys, xs = np.nonzero(br_r.any(axis=1))[0], np.nonzero(br_r.any(axis=0))[0]
        if len(ys):
            pad = int(12 / render_mpp)
            y0, y1 = max(0, ys[0] - pad), min(rh, ys[-1] + pad + 1)
            x0, x1 = max(0, xs[0] - pad), min(rw, xs[-1] + pad + 1)
            sigma = 4.0 / render_mpp
            sub = rgb[y0:y1, x0:x1].astype(np.float32)
            blurred = ndi.gaussian_filter(sub, (sigma, sigma, 0))
            mm = br_r[y0:y1, x0:x1]
            sub[mm] = blurred[mm]
            rgb[y0:y1, x0:x1] = np.clip(sub, 0, 255).astype(np.uint8)
    if extra is not None:
        rgb = np.clip(rgb.astype(np.float32) * np.power(10.0, -extra), 0, 255).astype(np.uint8)

    level0 = (
        np.asarray(Image.fromarray(rgb).resize((W, Hh), Image.Resampling.BILINEAR))
        if (rw, rh) != (W, Hh)
        else rgb
    )
    _write_pyramid(path, level0, mpp, compression, tile)
    truth = SyntheticTruth(
        path=path,
        classes=tuple(classes),
        downsample=float(t),
        mpp=float(mpp),
        dimensions=(W, Hh),
        class_map=class_map,
        pen=pen_t,
        blur=blur_t,
        fold=fold_t,
    )
    tp = truth_path(path)
    tmp = tp.with_name(tp.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        classes=np.array(classes),
        downsample=t,
        mpp=mpp,
        dimensions=np.array([W, Hh]),
        class_map=class_map,
        pen=pen_t,
        blur=blur_t,
        fold=fold_t,
    )
    os.replace(tmp, tp)
    return truth


def _write_pyramid(path: Path, level0: np.ndarray, mpp: float, compression: str, tile: int) -> None:
    """Pyramidal tiled TIFF: one IFD per level (x2 steps down to < 512 px), resolution in px/cm."""
    import tifffile

    comp = {"jpeg": ("jpeg", 90), "deflate": ("zlib", 6), "none": (None, None)}.get(compression)
    if comp is None:
        raise ValueError(f"compression must be jpeg, deflate or none, got {compression!r}")
    tmp = path.with_name(f".{path.name}.tmp")
    img = level0
    res = 1e4 / mpp  # px per cm
    with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
        level = 0
        while True:
            kw = {}
            if comp[0] == "jpeg":
                kw = {"compression": "jpeg", "compressionargs": {"level": comp[1]}}
            elif comp[0] == "zlib":
                kw = {"compression": "zlib", "compressionargs": {"level": comp[1]}}
            tw.write(
                img,
                tile=(tile, tile),
                photometric="rgb",
                resolution=(res / 2**level, res / 2**level),
                resolutionunit="CENTIMETER",
                metadata=None,
                subfiletype=1 if level else 0,
                **kw,
            )
            if max(img.shape[:2]) < 2 * 256 or min(img.shape[:2]) < 64:
                break
            img = np.asarray(Image.fromarray(img).reduce(2))
            level += 1
    os.replace(tmp, path)


def make_synthetic_cohort(
    out_dir: str | os.PathLike,
    n_slides: int = 4,
    seed: int = 0,
    size: int = 3072,
    mpp: float | tuple[float, ...] = 0.5,
    **kwargs,
) -> list[Path]:
    """``n_slides`` synthetic slides ``slide_000.tiff``... in ``out_dir`` (existing ones are kept)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mpps = (mpp,) if isinstance(mpp, (int, float)) else tuple(mpp)
    paths = []
    for i in range(n_slides):
        p = out / f"slide_{i:03d}.tiff"
        if not (p.is_file() and truth_path(p).is_file()):
            make_synthetic_slide(p, size=size, mpp=mpps[i % len(mpps)], seed=seed * 1000 + i, **kwargs)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- patch datasets


def render_patch(name: str, size: int, mpp: float, rng: np.random.Generator, stain=None) -> np.ndarray:
    """One RGB uint8 [size, size, 3] patch of class ``name`` at ``mpp`` µm/px."""
    stain = stain if stain is not None else _stain(rng)
    H, E = render_class(name, size, size, mpp, rng)
    bg = np.array(rng.uniform(0.01, 0.04, 3), np.float32)
    return _to_rgb(H, E, stain, rng, background=bg)


def make_synthetic_patch_dataset(
    root: str | os.PathLike,
    n_per_class: int = 50,
    size: int = 224,
    mpp: float = 0.5,
    seed: int = 0,
    classes: tuple[str, ...] = TISSUE_CLASSES,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> Path:
    """Labelled tiles ``root/{train,val,test}/<class>/*.png`` (``n_per_class`` per class over the splits).

    Each split draws its own stains (groups of 8 patches share one, like tiles of a slide), so a
    classifier must generalise across stain variation.
    """
    root = Path(root)
    names = ("train", "val", "test")
    counts = [int(round(n_per_class * s)) for s in splits]
    counts[0] = n_per_class - counts[1] - counts[2]
    for si, (split, n) in enumerate(zip(names, counts)):
        for ci, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, si, ci])
            stain = None
            for k in range(n):
                p = d / f"{name}_{k:04d}.png"
                if k % 8 == 0:
                    stain = _stain(np.random.default_rng([seed, si, k // 8, 77]))
                img = render_patch(name, size, mpp, rng, stain)
                if p.is_file():
                    continue
                tmp = p.with_name(f".{p.name}.tmp.png")
                Image.fromarray(img).save(tmp)
                os.replace(tmp, p)
    return root

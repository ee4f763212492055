"""Artifact masks on a thumbnail: pen ink (blue, green, black, red), blur (local sharpness), folds.

All masks are bool [h, w] at thumbnail resolution; ``px_um`` (µm per thumbnail px) sizes the filters.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from openpluto.slide.config import TissueConfig


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in [0, 1), saturation and value of an RGB uint8 image (float32 [h, w] each)."""
    x = rgb.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(axis=2), x.min(axis=2)
    d = mx - mn
    dd = np.where(d > 1e-6, d, 1.0)
    h = (
        np.where(mx == r, ((g - b) / dd) % 6.0, np.where(mx == g, (b - r) / dd + 2.0, (r - g) / dd + 4.0))
        / 6.0
    )
    h = np.where(d > 1e-6, h, 0.0)
    s = np.where(mx > 1e-6, d / np.maximum(mx, 1e-6), 0.0)
    return h.astype(np.float32), s.astype(np.float32), mx.astype(np.float32)


def pen_masks(rgb: np.ndarray, px_um: float) -> dict[str, np.ndarray]:
    """Ink masks by colour: ``blue``, ``green``, ``black``, ``red`` (bool [h, w] each).

    H&E and common IHC stains are purple/pink/brown; ink hues (cyan-blue with more green than red,
    green) and near-neutral black are outside them. Red ink is very saturated pure red.
    """
    small = rgb if min(rgb.shape[:2]) < 8 else ndi.uniform_filter(rgb.astype(np.float32), size=(3, 3, 1))
    h, s, v = _hsv(np.clip(small, 0, 255).astype(np.uint8))
    r, g = small[..., 0], small[..., 1]
    out = {
        "blue": (h >= 0.50) & (h < 0.675) & (s > 0.35) & (g >= r - 8) & (v < 0.97),
        "green": (h >= 0.19) & (h < 0.50) & (s > 0.22) & (v < 0.95),
        "black": (v < 0.3) & (s < 0.3),
        "red": ((h < 0.03) | (h > 0.94)) & (s > 0.7) & (v > 0.25),
    }
    min_px = 1500.0 / (px_um * px_um)  # ink blobs smaller than ~40 x 40 µm are noise
    for k, m in out.items():
        m = ndi.binary_opening(m, iterations=1) if m.any() else m
        out[k] = _remove_small(m, min_px)
    return out


def smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing; large sigmas run on a box-reduced copy and are upsampled back (fast)."""
    if sigma <= 6:
        return ndi.gaussian_filter(a.astype(np.float32), sigma)
    f = max(1, int(sigma // 3))
    h, w = a.shape
    small = np.asarray(
        Image.fromarray(a.astype(np.float32)).resize((max(1, w // f), max(1, h // f)), Image.Resampling.BOX)
    )
    small = ndi.gaussian_filter(small, sigma / f)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def grow(mask: np.ndarray, r: float) -> np.ndarray:
    """Dilate by a disk of radius ``r`` px (distance transform; fast for large radii)."""
    if r <= 0 or not mask.any():
        return mask
    return ndi.distance_transform_edt(~mask) <= r


def shrink(mask: np.ndarray, r: float) -> np.ndarray:
    """Erode by a disk of radius ``r`` px."""
    if r <= 0 or not mask.any():
        return mask
    return ndi.distance_transform_edt(mask) > r


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def sharpness_map(rgb: np.ndarray, px_um: float, cell_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Local sharpness: energy of the finest band over energy of the next band (difference of Gaussians),
    averaged over ``cell_um``; and the local mid-band energy. float32 [h, w] each.

    Focus blur removes the fine band first, so the ratio drops; flat but sharp tissue keeps its pixel
    noise in the fine band, so the ratio stays high there.
    """
    gray = rgb.astype(np.float32).mean(axis=2) / 255.0
    s = max(1.0, cell_um / px_um / 2.0)
    g1 = ndi.gaussian_filter(gray, 1.0)
    g3 = ndi.gaussian_filter(gray, 3.0)
    fine = smooth((gray - g1) ** 2, s)
    mid = smooth((g1 - g3) ** 2, s)
    return fine / (mid + 1e-6), mid


def blur_mask(rgb: np.ndarray, tissue: np.ndarray, px_um: float, cfg: TissueConfig) -> np.ndarray:
    """Tissue whose local sharpness is below ``cfg.blur_rel`` x the slide's median sharpness."""
    if tissue.sum() < 64:
        return np.zeros_like(tissue)
    ratio, contrast = sharpness_map(rgb, px_um, cfg.blur_cell_um)
    core = shrink(tissue, max(1, int(cfg.blur_cell_um / px_um / 2)))
    core = core if core.sum() >= 64 else tissue
    textured = core & (contrast > 1e-4)
    if textured.sum() < 64:
        return np.zeros_like(tissue)
    ref = float(np.median(ratio[textured]))
    blur = tissue & (ratio < cfg.blur_rel * ref)
    r = max(1, int(cfg.blur_cell_um / px_um / 2))
    blur = grow(shrink(blur, r), r)
    blur = _remove_small(blur, (2 * cfg.blur_cell_um / px_um) ** 2)
    # The smoothed measure blends sharp and blurred tissue at the border: grow by a cell.
    return grow(blur, 2 * r) & tissue


def fold_mask(
    rgb: np.ndarray, tissue: np.ndarray, exclude: np.ndarray, px_um: float, cfg: TissueConfig
) -> np.ndarray:
    """Folds: tissue much denser (optical density > ``fold_rel`` x typical) and more saturated."""
    from openpluto.slide.tissue import optical_density

    m = tissue & ~exclude
    if m.sum() < 64:
        return np.zeros_like(tissue)
    od, _ = optical_density(rgb)
    dens = ndi.gaussian_filter(od.sum(axis=2), max(1.0, 10.0 / px_um))
    _, s, _ = _hsv(rgb)
    s = ndi.gaussian_filter(s, max(1.0, 10.0 / px_um))
    ref = float(np.percentile(dens[m], 75))
    # Local reference: mean density of the surrounding tissue (~150 µm), so folds over pale tissue count.
    sig = max(2.0, 150.0 / px_um)
    local = smooth(dens * m, sig) / np.maximum(smooth(m.astype(np.float32), sig), 1e-3)
    dense = (dens > cfg.fold_rel * ref) | ((dens > 0.85 * cfg.fold_rel * local) & (dens > ref))
    fold = m & dense & (s > float(np.median(s[m])))
    fold = grow(shrink(fold, max(1, int(5 / px_um))), max(1, int(5 / px_um)))
    return _remove_small(fold, 5000.0 / (px_um * px_um))


def detect_artifacts(
    rgb: np.ndarray, tissue: np.ndarray, px_um: float, cfg: TissueConfig, dark: bool = False
) -> dict[str, np.ndarray]:
    """``{"pen", "blur", "fold"}`` bool masks (each grown by ``cfg.artifact_margin_um``)."""
    zeros = np.zeros(rgb.shape[:2], bool)
    out = {"pen": zeros.copy(), "blur": zeros.copy(), "fold": zeros.copy()}
    if dark:  # fluorescence: no ink/fold colours to look for; sharpness of sparse nuclei is unreliable
        return out
    if cfg.pen:
        for m in pen_masks(rgb, px_um).values():
            out["pen"] |= m
    if cfg.blur:
        out["blur"] = blur_mask(rgb, tissue & ~out["pen"], px_um, cfg)
    if cfg.fold:
        out["fold"] = fold_mask(rgb, tissue, out["pen"] | out["blur"], px_um, cfg)
    margin = int(math.ceil(cfg.artifact_margin_um / px_um))
    if margin > 0:
        for k in out:
            if out[k].any():
                out[k] = grow(out[k], margin)
    return out

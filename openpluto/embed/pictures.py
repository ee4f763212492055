"""Pictures of what the encoder sees.

- ``patch_pca_rgb``: DINOv2-style PCA of patch tokens shown as RGB: the first principal component
  separates foreground from background, the first three components of the foreground tokens become
  red/green/blue. Several tiles share one PCA, so colours are comparable across them.
- ``feature_pc1`` + ``save_pc1_heatmap``: the first principal component of the tile features of a
  slide, painted tile by tile over the slide thumbnail (streamed: memory O(D^2), not O(tiles)).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from openpluto.io import atomic_path

# ----------------------------------------------------------------------------- PCA helpers


def _principal_axes(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and top-``k`` principal axes [k, D] of rows ``x`` [n, D]; signs made deterministic."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes = vt[:k]
    return mean, _fix_signs(axes)


def _fix_signs(axes: np.ndarray) -> np.ndarray:
    """Flip each axis so that its largest-magnitude loading is positive (PCA signs are arbitrary)."""
    idx = np.abs(axes).argmax(axis=1)
    signs = np.sign(axes[np.arange(len(axes)), idx])
    signs[signs == 0] = 1
    return axes * signs[:, None]


def _minmax(v: np.ndarray, lo_q: float = 1.0, hi_q: float = 99.0) -> np.ndarray:
    """Scale to 0..1 per column between the ``lo_q``/``hi_q`` percentiles (robust to outliers)."""
    lo = np.percentile(v, lo_q, axis=0)
    hi = np.percentile(v, hi_q, axis=0)
    return np.clip((v - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)


def patch_pca_rgb(tokens: np.ndarray | torch.Tensor, grid: tuple[int, int],
                  foreground: bool = False) -> np.ndarray:
    """Patch tokens ``[B, h*w, D]`` (or ``[h*w, D]``) -> RGB ``float32 [B, h, w, 3]`` in 0..1.

    One PCA over all tokens of all images; components 1-3 -> red, green, blue (1st-99th percentile
    scaled). With ``foreground`` (DINOv2's figures), PC1 is first thresholded at the middle of its range,
    the larger side is kept as foreground, the 3-component PCA is refitted on it and the rest is black.
    """
    t = tokens.detach().float().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if t.ndim == 2:
        t = t[None]
    b, n, d = t.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} does not match {n} tokens")
    flat = t.reshape(b * n, d).astype(np.float64)
    fg = np.ones(b * n, dtype=bool)
    if foreground and b * n >= 8:
        mean, ax = _principal_axes(flat, 1)
        pc1 = (flat - mean) @ ax[0]
        side = pc1 > 0.5 * (pc1.min() + pc1.max())
        fg = side if side.sum() >= (~side).sum() else ~side
    rgb = np.zeros((b * n, 3), dtype=np.float64)
    k = min(3, d, int(fg.sum()) - 1)
    if k >= 1:
        mean, ax = _principal_axes(flat[fg], k)
        rgb[fg, :k] = _minmax((flat[fg] - mean) @ ax.T)
    return rgb.reshape(b, h, w, 3).astype(np.float32)


@torch.inference_mode()
def encoder_tokens(encoder, images: np.ndarray, patch_size: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 RGB ``[B, H, W, 3]`` -> patch tokens ``[B, h*w, D]`` and the grid, normalised as in ``embed``."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).to(device).float() / 255.0
    mean = torch.tensor(encoder.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=x.device).view(1, 3, 1, 1)
    out = encoder.forward_features((x - mean) / std, patch_size=patch_size)
    return out["patch"].float().cpu(), tuple(int(g) for g in out["grid"])


def save_patch_pca(path: str | os.PathLike, images: np.ndarray, rgb: np.ndarray, title: str = "") -> Path:
    """PNG with each image above its PCA map (nearest-neighbour upsampled to the image size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = len(images)
    fig, axes = plt.subplots(b, 2, figsize=(7.0, 3.4 * b + 0.6), squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(images[i])
        axes[i, 1].imshow(rgb[i], interpolation="nearest",
                          extent=(0, images[i].shape[1], images[i].shape[0], 0))
        for a in axes[i]:
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, 1].set_title("patch-token PCA (RGB = PC 1-3)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    return _save_fig(fig, path)


def _save_fig(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- slide heat map


def feature_pc1(chunks: Callable[[], Iterable[np.ndarray]] | np.ndarray) -> np.ndarray:
    """First principal-component score of each row of the features ``[N, D]`` -> ``float32 [N]``.

    ``chunks`` is an array or a callable returning an iterator over row chunks (called twice: one
    pass for the mean/covariance, one for the projection), so memory is O(D^2).
    """
    if isinstance(chunks, np.ndarray):
        arr = chunks
        chunks = lambda: iter([arr])  # noqa: E731
    n, s, ss = 0, None, None
    for c in chunks():
        c = np.asarray(c, dtype=np.float64)
        if not len(c):
            continue
        s = c.sum(0) if s is None else s + c.sum(0)
        ss = c.T @ c if ss is None else ss + c.T @ c
        n += len(c)
    if n == 0 or s is None or ss is None:
        return np.zeros(0, np.float32)
    mean = s / n
    cov = ss / n - np.outer(mean, mean)
    _, vecs = np.linalg.eigh(cov)
    axis = _fix_signs(vecs[:, -1][None])[0]
    out = [(np.asarray(c, dtype=np.float64) - mean) @ axis for c in chunks()]
    return np.concatenate(out).astype(np.float32) if n > 1 else np.zeros(n, np.float32)


def heatmap_image(thumbnail: np.ndarray, downsample: float, coords: np.ndarray, tile_size_level0: int,
                  values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value grid ``float32 [h, w]`` with NaN off-tile, count) on the thumbnail's pixel grid.

    ``coords`` are level-0 top-left corners; ``downsample`` is level-0 px per thumbnail px.
    """
    h, w = thumbnail.shape[:2]
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.int32)
    side = tile_size_level0 / downsample
    for (x, y), v in zip(np.asarray(coords), np.asarray(values)):
        x0, y0 = int(np.floor(x / downsample)), int(np.floor(y / downsample))
        x1, y1 = int(np.ceil(x / downsample + side)), int(np.ceil(y / downsample + side))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, max(x1, x0 + 1)), min(h, max(y1, y0 + 1))
        acc[y0:y1, x0:x1] += v
        cnt[y0:y1, x0:x1] += 1
    out = np.full((h, w), np.nan, np.float32)
    m = cnt > 0
    out[m] = (acc[m] / cnt[m]).astype(np.float32)
    return out, cnt


# Diverging blue - white - red colour map (value 0..1 -> RGB), like matplotlib's "coolwarm".
_CMAP_X = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_RGB = np.array([[59, 76, 192], [141, 176, 254], [221, 221, 221], [244, 154, 123], [180, 4, 38]], float)


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> uint8 RGB ``[..., 3]`` on a blue-white-red scale."""
    v = np.clip(np.nan_to_num(np.asarray(v, dtype=np.float64), nan=0.5), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def save_pc1_heatmap(path: str | os.PathLike, thumbnail: np.ndarray, downsample: float, coords: np.ndarray,
                     tile_size_level0: int, values: np.ndarray, title: str = "", alpha: float = 0.65) -> Path:
    """PNG: the thumbnail beside PC1 of the tile features painted over it, with a colour bar.

    Drawn with PIL (fast enough to run after every slide); the bar spans the 2nd-98th percentile.
    """
    from PIL import Image, ImageDraw

    grid, _ = heatmap_image(thumbnail, downsample, coords, tile_size_level0, values)
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(np.percentile(finite, q)) for q in (2, 98)) if len(finite) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1e-6
    thumb = np.asarray(thumbnail, np.uint8)[..., :3]
    on = np.isfinite(grid)
    colours = colormap((grid - lo) / (hi - lo))
    over = thumb.astype(np.float32)
    over[on] = (1 - alpha) * over[on] + alpha * colours[on]
    from openpluto.slide.qc import label_font

    h, w = thumb.shape[:2]
    font = label_font(2 * w)
    fs = getattr(font, "size", 11)
    pad, bar_w, head = 8, 14, int(fs * 1.5)
    canvas = Image.new("RGB", (2 * w + 3 * pad + bar_w + int(4 * fs), h + head + pad), "white")
    canvas.paste(Image.fromarray(thumb), (pad, head))
    canvas.paste(Image.fromarray(over.round().astype(np.uint8)), (2 * pad + w, head))
    ramp = colormap(np.linspace(1, 0, max(h, 2)))[:, None, :].repeat(bar_w, axis=1)
    bx = 3 * pad + 2 * w
    canvas.paste(Image.fromarray(ramp), (bx, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), title or f"PC1 of {len(values)} tile features", fill="black", font=font)
    draw.text((bx + bar_w + 3, head), f"{hi:.3g}", fill="black", font=font)
    draw.text((bx + bar_w + 3, head + h - fs - 2), f"{lo:.3g}", fill="black", font=font)
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def iter_rows(dataset, chunk: int = 4096) -> Callable[[], Iterator[np.ndarray]]:
    """A re-callable chunk iterator over an h5 dataset (for ``feature_pc1``)."""
    def it() -> Iterator[np.ndarray]:
        for s in range(0, len(dataset), chunk):
            yield dataset[s:s + chunk]
    return it


def region_pca_picture(cfg, encoder=None, device: str = "cpu") -> Path:
    """``openpluto embed-pca``: read ``cfg.size`` px at ``cfg.mpp``, PCA its patch tokens, save a PNG.

    Without ``cfg.x``/``cfg.y`` the region is placed on the grid cell with the most usable tissue.
    """
    from openpluto.errors import ConfigError
    from openpluto.slide import detect_tissue, grid_tiles, open_slide, resolve_mpp

    if not cfg.out:
        raise ConfigError("no output PNG given (--out FILE.png)")
    if encoder is None:
        from openpluto.model import load_encoder

        if not cfg.model:
            raise ConfigError("no model given: --model MODEL_DIR, timm:NAME:WEIGHTS or a preset name")
        torch.manual_seed(cfg.seed)
        encoder = load_encoder(cfg.model, device=device)
    patch = int(cfg.patch_size or encoder.default_patch_size)
    if cfg.size % patch:
        raise ConfigError(f"--size {cfg.size} is not divisible by the patch size {patch}")
    override = resolve_mpp(cfg.slide, cfg.mpp_override) if cfg.mpp_override else None
    with open_slide(cfg.slide, mpp_override=override) as slide:
        x, y = cfg.x, cfg.y
        if x is None or y is None:
            grid = np.asarray(grid_tiles(slide, detect_tissue(slide), cfg.mpp, cfg.size, min_tissue=0.0))
            if not len(grid):
                raise ConfigError(f"{cfg.slide}: no tissue found; give --x and --y")
            best = grid[np.argmax(grid[:, 2])]
            x, y = int(best[0]), int(best[1])
        image = slide.read(int(x), int(y), cfg.size, cfg.mpp)
    tokens, grid_hw = encoder_tokens(encoder, image[None], patch_size=patch, device=device)
    rgb = patch_pca_rgb(tokens, grid_hw, foreground=cfg.foreground)
    title = (f"{Path(cfg.slide).name} at ({x}, {y}) level 0\n{cfg.size} px at {cfg.mpp} µm/px, "
             f"patch {patch}, {encoder.name}")
    return save_patch_pca(cfg.out, image[None], rgb, title=title)

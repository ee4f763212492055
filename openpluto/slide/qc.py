"""QC pictures: thumbnail with tissue, each artifact class and the tiles drawn; mask PNG; tile mosaics."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from openpluto.io import atomic_path
from openpluto.slide.tissue import TissueResult

ARTIFACT_RGB = {"pen": (0, 70, 255), "blur": (255, 210, 0), "fold": (230, 0, 0)}
TISSUE_RGB = (0, 170, 0)
TILE_RGBS = [(255, 0, 255), (0, 200, 255), (255, 128, 0), (120, 60, 255), (0, 0, 0), (140, 90, 40)]


def label_font(width_px: int) -> ImageFont.ImageFont:
    """A font for labels on a picture ``width_px`` wide, readable when it is shown at half size."""
    size = int(min(28, max(14, width_px / 34)))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap font
        return ImageFont.load_default()


def _save(img: Image.Image, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def mask_png(result: TissueResult) -> Image.Image:
    """Label image: 0 background, 255 usable tissue, 128 tissue excluded as artifact."""
    out = np.zeros(result.tissue.shape, np.uint8)
    out[result.tissue] = 128
    out[result.usable] = 255
    return Image.fromarray(out, mode="L")


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    edge = np.zeros_like(m)
    edge[1:-1, 1:-1] = m[1:-1, 1:-1] & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])
    return edge


def overlay(
    result: TissueResult, tiles: dict[str, np.ndarray] | None = None, max_size: int = 1400, title: str = ""
) -> Image.Image:
    """Thumbnail + tissue outline (green) + artifacts (blue pen, yellow blur, red fold) + tiles.

    ``tiles`` maps a label (e.g. "0.5um 275px") to ``(coords, size_l0)``: coords [N, >=2] level-0
    x, y of the tiles and their level-0 side length; each label gets its own colour.
    """
    thumb = result.thumbnail
    scale = min(1.0, max_size / max(thumb.shape[:2]))
    size = (max(1, int(thumb.shape[1] * scale)), max(1, int(thumb.shape[0] * scale)))
    base = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BILINEAR)).astype(np.float32)

    def fit(m: np.ndarray) -> np.ndarray:
        return (
            np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
        )

    for name, m in result.artifacts.items():
        mm = fit(m)
        base[mm] = 0.45 * base[mm] + 0.55 * np.array(ARTIFACT_RGB.get(name, (128, 128, 128)), np.float32)
    t = fit(result.tissue)
    edge = _outline(t)
    thick = edge | np.roll(edge, 1, 0) | np.roll(edge, 1, 1)
    base[thick] = TISSUE_RGB
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    f = scale / result.downsample  # overlay px per level-0 px
    legend = [("tissue", TISSUE_RGB)] + [(k, ARTIFACT_RGB[k]) for k in result.artifacts if k in ARTIFACT_RGB]
    for i, (label, (coords, size_l0)) in enumerate((tiles or {}).items()):
        color = TILE_RGBS[i % len(TILE_RGBS)]
        legend.append((f"{label} ({len(coords)})", color))
        step = max(1, len(coords) // 3000)
        for x, y in np.asarray(coords)[::step, :2]:
            draw.rectangle([x * f, y * f, (x + size_l0) * f, (y + size_l0) * f], outline=color)
    # Legend strip at the bottom.
    font = label_font(img.width)
    row = int(font.size * 1.35) if hasattr(font, "size") else 18
    strip = Image.new("RGB", (img.width, row * (len(legend) + (1 if title else 0)) + 6), (255, 255, 255))
    d2 = ImageDraw.Draw(strip)
    yy = 3
    if title:
        d2.text((6, yy), title, fill=(0, 0, 0), font=font)
        yy += row
    for label, color in legend:
        d2.rectangle([6, yy + 2, 6 + row - 6, yy + row - 4], fill=color)
        d2.text((row + 6, yy + 1), label, fill=(0, 0, 0), font=font)
        yy += row
    out = Image.new("RGB", (img.width, img.height + strip.height), (255, 255, 255))
    out.paste(img, (0, 0))
    out.paste(strip, (0, img.height))
    return out


def mosaic(tiles: Sequence[np.ndarray], cols: int = 8, cell: int = 128, title: str = "") -> Image.Image:
    """Grid of RGB tiles resized to ``cell`` px (a look at what the shards hold)."""
    n = max(1, len(tiles))
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    width = cols * (cell + 2) + 2
    font = label_font(width)
    top = int(font.size * 1.5) if title and hasattr(font, "size") else (20 if title else 0)
    out = Image.new("RGB", (width, rows * (cell + 2) + 2 + top), (255, 255, 255))
    if title:
        ImageDraw.Draw(out).text((4, 4), title, fill=(0, 0, 0), font=font)
    for i, t in enumerate(tiles):
        im = Image.fromarray(np.asarray(t)).resize((cell, cell), Image.Resampling.LANCZOS)
        out.paste(im, (2 + (i % cols) * (cell + 2), top + 2 + (i // cols) * (cell + 2)))
    return out


def save_overlay(path, result: TissueResult, tiles=None, title: str = "") -> None:
    _save(overlay(result, tiles, title=title), path)


def save_mask(path, result: TissueResult) -> None:
    _save(mask_png(result), path)


def save_mosaic(path, tiles: Sequence[np.ndarray], title: str = "", cols: int = 8) -> None:
    _save(mosaic(tiles, cols=cols, title=title), path)

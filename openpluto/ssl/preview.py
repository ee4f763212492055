"""A PNG of the views the student and teacher see: every crop of a few tiles, with the iBOT masks.

Useful to check augmentation strength on one's own stain before a long run:
``save_views_png(tiles, MultiCropTransform(cfg.crops), "views.png", mean, std, cfg.masks, 16)``.
One row per tile: the global crops (masked tokens shaded red), then the local crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from openpluto.io import atomic_path
from openpluto.ssl.augment import BatchAugment
from openpluto.ssl.config import MaskConfig
from openpluto.ssl.masking import sample_masks
from openpluto.ssl.multicrop import MultiCropTransform, collate_multicrop


def _to_uint8(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised ``[3, H, W]`` -> RGB uint8 ``[H, W, 3]``."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (t * s + m).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def render_views(
    tiles: Sequence[Image.Image],
    transform: MultiCropTransform,
    mean: Sequence[float],
    std: Sequence[float],
    masks_cfg: MaskConfig | None = None,
    patch_size: int = 16,
    seed: int = 0,
    gap: int = 4,
) -> Image.Image:
    """One row per tile: global crops (masked patches tinted red when ``masks_cfg``), then local crops."""
    torch.manual_seed(seed)
    cfg = transform.cfg
    n_g, n_l, G, L = cfg.n_global, cfg.n_local, cfg.global_size, cfg.local_size
    batch = BatchAugment(cfg.augment, mean, std)(collate_multicrop([transform(t) for t in tiles]), "cpu")
    B = len(tiles)
    views = [{"global_crops": [batch["global_crops"][c * B + i] for c in range(n_g)],
              "local_crops": [batch["local_crops"][c * B + i] for c in range(n_l)]} for i in range(B)]
    masks = None
    if masks_cfg is not None:
        grid = (G // patch_size, G // patch_size)
        masks = sample_masks(n_g * len(tiles), grid, masks_cfg, torch.Generator().manual_seed(seed))
        masks = masks.view(n_g, len(tiles), *grid)
    width = n_g * (G + gap) + n_l * (L + gap) + gap
    height = len(tiles) * (G + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for row, v in enumerate(views):
        y = gap + row * (G + gap)
        x = gap
        for c, crop in enumerate(v["global_crops"]):
            img = Image.fromarray(_to_uint8(crop, mean, std))
            if masks is not None and masks[c, row].any():
                overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
                draw = ImageDraw.Draw(overlay)
                for i, j in masks[c, row].nonzero().tolist():
                    box = (j * patch_size, i * patch_size, (j + 1) * patch_size - 1, (i + 1) * patch_size - 1)
                    draw.rectangle(box, fill=(255, 0, 0, 110))
                img = Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")
            canvas.paste(img, (x, y))
            x += G + gap
        for crop in v["local_crops"]:
            canvas.paste(Image.fromarray(_to_uint8(crop, mean, std)), (x, y))
            x += L + gap
    return canvas


def save_views_png(
    tiles: Sequence[Image.Image],
    transform: MultiCropTransform,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    masks_cfg: MaskConfig | None = None,
    patch_size: int = 16,
    seed: int = 0,
) -> Path:
    """Write :func:`render_views` to ``path`` (PNG, atomically); returns the path."""
    img = render_views(tiles, transform, mean, std, masks_cfg, patch_size, seed)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path

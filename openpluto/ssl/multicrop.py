"""Multi-crop views of a tile (Caron et al. 2020, SwAV; DINO; DINOv2) and their batch collation.

``MultiCropTransform(cfg.crops, mean, std)(tile)`` -> ``{"global_crops": [3xGxG] * n_global,
"local_crops": [3xLxL] * n_local}``, float32, normalised with ``mean``/``std`` (0..1 RGB statistics).
``collate_multicrop`` stacks them crop-major: crop 0 of every image, then crop 1, ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from openpluto.errors import OpenPlutoError
from openpluto.ssl.augment import build_steps
from openpluto.ssl.config import CropConfig


class MultiCropTransform:
    """Cut ``n_global`` global and ``n_local`` local random-resized crops and augment each.

    Args:
        cfg: crop sizes/scales and the augmentation steps.
        mean, std: per-channel statistics of 0..1 RGB used to normalise (the backbone's).
    """

    def __init__(self, cfg: CropConfig, mean: Sequence[float], std: Sequence[float]):
        cfg.validate()
        self.cfg = cfg
        to_float = [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)]
        norm = [v2.Normalize(mean=list(mean), std=list(std))]

        def crop(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC,
                                        antialias=True)

        self.global_transforms = [
            v2.Compose([crop(cfg.global_size, cfg.global_scale), *to_float,
                        *build_steps(cfg.augment, i), *norm])
            for i in range(cfg.n_global)
        ]
        self.local_transform = v2.Compose([crop(cfg.local_size, cfg.local_scale), *to_float,
                                           *build_steps(cfg.augment, "local"), *norm])

    def __call__(self, img: Image.Image | np.ndarray) -> dict[str, list[torch.Tensor]]:
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise OpenPlutoError(
                f"MultiCropTransform expects a PIL image or uint8 array, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        return {
            "global_crops": [t(img).contiguous() for t in self.global_transforms],
            "local_crops": [self.local_transform(img).contiguous() for _ in range(self.cfg.n_local)],
        }

    def __repr__(self) -> str:
        c = self.cfg
        return (f"MultiCropTransform({c.n_global}x{c.global_size}px + {c.n_local}x{c.local_size}px, "
                f"steps={list(c.augment.steps)})")


def collate_multicrop(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack multi-crop samples crop-major.

    Returns ``global_crops`` ``[n_global*B, 3, G, G]`` (crop 0 of all images, then crop 1, ...),
    ``local_crops`` ``[n_local*B, 3, L, L]`` (an empty ``[0, 3, 0, 0]`` tensor without local crops)
    and ``batch_size`` B.
    """
    if not samples:
        raise OpenPlutoError("collate_multicrop got an empty batch")
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    if any(len(s["global_crops"]) != n_global or len(s["local_crops"]) != n_local for s in samples):
        raise OpenPlutoError("collate_multicrop: samples have different numbers of crops")
    glob = torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples])
    if n_local:
        loc = torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples])
    else:
        loc = torch.empty(0, *glob.shape[1:2], 0, 0, dtype=glob.dtype)
    return {"global_crops": glob, "local_crops": loc, "batch_size": len(samples)}

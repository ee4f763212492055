"""Multi-crop views of a tile (Caron et al. 2020, SwAV; DINO; DINOv2): the loader-worker half, and collation.

``MultiCropTransform(cfg.crops)(tile)`` cuts ``n_global`` global and ``n_local`` local random-resized
crops as uint8 and draws each crop's augmentation parameters (:func:`~openpluto.ssl.augment.draw_params`):
``{"global_crops": [uint8 3xGxG] * n_global, "local_crops": [uint8 3xLxL] * n_local,
"global_params": {name: [n_global, ...]}, "local_params": {name: [n_local, ...]}}``.
``collate_multicrop`` stacks samples crop-major (crop 0 of every image, then crop 1, ...), and
:class:`~openpluto.ssl.augment.BatchAugment` turns the batch into augmented, normalised float views on
the model's device. All randomness is drawn here, from the global torch RNG the data pipeline seeds per
sample, so a sample's views depend only on that seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from openpluto.errors import OpenPlutoError
from openpluto.ssl.augment import PARAM_SPECS, draw_params
from openpluto.ssl.config import CropConfig


class MultiCropTransform:
    """Cut ``n_global`` global and ``n_local`` local random-resized crops (uint8) and draw their augmentation.

    Args:
        cfg: crop sizes/scales and the augmentation steps (:class:`~openpluto.ssl.config.CropConfig`).
    """

    def __init__(self, cfg: CropConfig):
        cfg.validate()
        self.cfg = cfg

        def crop(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC,
                                        antialias=True)

        self.global_crop = crop(cfg.global_size, cfg.global_scale)
        self.local_crop = crop(cfg.local_size, cfg.local_scale)
        self.kinds: list[int | str] = [*range(cfg.n_global), *(["local"] * cfg.n_local)]

    def __call__(self, img: Image.Image | np.ndarray) -> dict[str, Any]:
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise OpenPlutoError(
                f"MultiCropTransform expects a PIL image or uint8 array, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        c = self.cfg
        glob = [TF.pil_to_tensor(self.global_crop(img)) for _ in range(c.n_global)]
        loc = [TF.pil_to_tensor(self.local_crop(img)) for _ in range(c.n_local)]
        params = draw_params(c.augment, self.kinds)
        return {
            "global_crops": glob,
            "local_crops": loc,
            "global_params": {k: v[: c.n_global] for k, v in params.items()},
            "local_params": {k: v[c.n_global:] for k, v in params.items()},
        }

    def __repr__(self) -> str:
        c = self.cfg
        return (f"MultiCropTransform({c.n_global}x{c.global_size}px + {c.n_local}x{c.local_size}px uint8, "
                f"steps={list(c.augment.steps)} drawn per crop)")


def _stack_params(samples: list[dict[str, Any]], key: str, n_crops: int) -> dict[str, torch.Tensor]:
    """Per-crop parameters of all samples, crop-major: ``{name: [n_crops * B, ...]}``."""
    out = {}
    for name, (dtype, shape) in PARAM_SPECS.items():
        if n_crops:
            out[name] = torch.stack([s[key][name] for s in samples], dim=1).flatten(0, 1)
        else:
            out[name] = torch.empty(0, *shape, dtype=dtype)
    return out


def collate_multicrop(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack multi-crop samples crop-major.

    Returns ``global_crops`` uint8 ``[n_global*B, 3, G, G]`` (crop 0 of all images, then crop 1, ...),
    ``local_crops`` uint8 ``[n_local*B, 3, L, L]`` (an empty ``[0, 3, 0, 0]`` tensor without local crops),
    ``global_params``/``local_params`` (each step's parameters, rows in the same order) and
    ``batch_size`` B. Other per-sample entries (e.g. ``position``) are gathered into lists.
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
    batch = {
        "global_crops": glob,
        "local_crops": loc,
        "global_params": _stack_params(samples, "global_params", n_global),
        "local_params": _stack_params(samples, "local_params", n_local),
        "batch_size": len(samples),
    }
    for key in samples[0].keys() - batch.keys():
        batch[key] = [s[key] for s in samples]
    return batch

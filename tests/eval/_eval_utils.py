"""Helpers of the eval tests: a tiny deterministic stand-in encoder and small PNG datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 200)}


class TinyEncoder(nn.Module):
    """Contract-shaped stand-in for ``openpluto.model.Encoder``: a fixed random patch projection."""

    def __init__(self, dim: int = 12, patch: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) * 0.1)
            self.proj.bias.zero_()
        self.embed_dim, self.default_patch_size, self.patch_sizes = dim, patch, (patch,)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.name, self.weights_hash = "tiny-standin", "abc123"
        self.eval()

    def forward_features(self, x, patch_size=None):
        t = self.proj(x)  # [B, D, h, w]
        b, d, h, w = t.shape
        patch = t.flatten(2).transpose(1, 2)
        return {"cls": patch.mean(1), "registers": patch[:, :0], "patch": patch, "grid": (h, w)}

    def embed(self, x, patch_size=None, pooling="cls"):
        f = self.forward_features(x, patch_size)
        return f["cls"] if pooling == "cls" else torch.cat([f["cls"], f["patch"].mean(1)], 1)

    def embed_dim_for(self, pooling="cls"):
        return self.embed_dim * (2 if pooling == "cls+mean" else 1)


def write_colour_dataset(
    root: Path,
    n_per_class: int,
    splits: tuple[str, ...] | None = ("train", "val", "test"),
    size: int = 40,
    seed: int = 0,
) -> Path:
    """PNG patches whose class is their base colour (plus noise), in ROOT/[split/]<class>/."""
    rng = np.random.default_rng(seed)
    for split in splits or (None,):
        for name, rgb in COLOURS.items():
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size + 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{name}_{i}.png")
    return root

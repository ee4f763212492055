"""Histology augmentations as configurable steps (torchvision.transforms.v2 where it serves).

Each crop is cut from the PIL tile, converted to float32 RGB in [0, 1] ``[3, S, S]``, then goes
through the steps named in :class:`~openpluto.ssl.config.AugmentConfig` ``steps`` (in that order):

- ``flip``: horizontal and vertical flips, each with ``flip_p``.
- ``rot90``: rotation by k*90°, k uniform in {0, 1, 2, 3} (tissue has no "up").
- ``hed``: HED stain jitter (Tellez et al., "Whole-slide mitosis detection in H&E breast histology
  using PHH3 as a reference", IEEE TMI 2018): RGB -> optical density -> haematoxylin/eosin/DAB
  concentrations (Ruifrok & Johnston 2001 stain vectors), each scaled by U(1-σ, 1+σ) and shifted by
  U(-σ, σ), and back.
- ``color``: brightness/contrast/saturation jitter (torchvision) then a hue rotation, with ``color_p``;
  the hue shift is a rotation of the chroma plane in YIQ space (one 3x3 matrix, ~20x cheaper than
  an HSV round trip and the same for the small shifts used on H&E).
- ``grayscale``: 3-channel grayscale with ``grayscale_p``.
- ``blur``: Gaussian blur, probability per crop kind (DINOv2: 1.0 / 0.1 global, 0.5 local).
- ``solarize``: invert values above 0.5, probability per crop kind (DINOv2: 0 / 0.2 global).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2

from openpluto.ssl.config import AugmentConfig

# Ruifrok & Johnston (2001) stain optical-density vectors (rows: haematoxylin, eosin, DAB), normalised.
_RGB_FROM_HED = torch.tensor(
    [[0.650, 0.704, 0.286],
     [0.072, 0.990, 0.105],
     [0.268, 0.570, 0.776]], dtype=torch.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1.0 / 255.0


def rgb_to_hed(img: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ``[3, H, W]`` -> stain concentrations ``[3, H, W]`` (H, E, D) in optical density."""
    od = -torch.log(img.clamp(min=_OD_FLOOR))
    m = _HED_FROM_RGB.to(img.dtype)
    return torch.einsum("chw,cd->dhw", od, m)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`, clamped to [0, 1]."""
    m = _RGB_FROM_HED.to(hed.dtype)
    od = torch.einsum("dhw,dc->chw", hed, m)
    return torch.exp(-od).clamp(0.0, 1.0)


class RandomHEDJitter(nn.Module):
    """Perturb H, E and D stain concentrations: ``s' = s * a + b``, a ~ U(1-σ, 1+σ), b ~ U(-σ, σ)."""

    def __init__(self, sigma: float = 0.05, p: float = 0.5):
        super().__init__()
        self.sigma, self.p = float(sigma), float(p)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or self.sigma <= 0 or torch.rand(()) >= self.p:
            return img
        hed = rgb_to_hed(img.float())
        alpha = 1.0 + (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        beta = (torch.rand(3, 1, 1) * 2 - 1) * self.sigma
        return hed_to_rgb(hed * alpha + beta).to(img.dtype)


class RandomRot90(nn.Module):
    """Rotate ``[..., H, W]`` by k*90°, k uniform in {0, 1, 2, 3}, with probability ``p``."""

    def __init__(self, p: float = 1.0):
        super().__init__()
        self.p = float(p)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return img
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def hue_rotation_matrix(shift: float) -> torch.Tensor:
    """``[3, 3]`` RGB -> RGB matrix rotating hue by ``shift`` turns (e.g. 0.02 = 7.2°) in YIQ space."""
    angle = 2.0 * math.pi * shift
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ


class RandomHue(nn.Module):
    """Rotate the hue of float RGB ``[3, H, W]`` by U(-hue, hue) turns (always; wrap in RandomApply)."""

    def __init__(self, hue: float):
        super().__init__()
        self.hue = float(hue)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.hue <= 0:
            return img
        shift = (float(torch.rand(())) * 2 - 1) * self.hue
        m = hue_rotation_matrix(shift).to(img.dtype)
        return torch.einsum("dc,chw->dhw", m, img).clamp_(0.0, 1.0)


def build_steps(cfg: AugmentConfig, kind: int | str) -> list[nn.Module]:
    """The augmentation steps of one crop kind: ``0``/``1`` (first/second global crop) or ``"local"``.

    Global crops after the second use the second's probabilities. Steps with probability 0 are left out.
    """
    if kind == "local":
        blur_p, solarize_p = cfg.blur_p_local, cfg.solarize_p_local
    else:
        i = min(int(kind), 1)
        blur_p, solarize_p = cfg.blur_p[i], cfg.solarize_p[i]
    steps: list[nn.Module] = []
    for name in cfg.steps:
        if name == "flip" and cfg.flip_p > 0:
            steps += [v2.RandomHorizontalFlip(cfg.flip_p), v2.RandomVerticalFlip(cfg.flip_p)]
        elif name == "rot90" and cfg.rot90_p > 0:
            steps.append(RandomRot90(cfg.rot90_p))
        elif name == "hed" and cfg.hed_p > 0 and cfg.hed_sigma > 0:
            steps.append(RandomHEDJitter(cfg.hed_sigma, cfg.hed_p))
        elif name == "color" and cfg.color_p > 0:
            jitter = [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation), RandomHue(cfg.hue)]
            steps.append(v2.RandomApply(jitter, p=cfg.color_p))
        elif name == "grayscale" and cfg.grayscale_p > 0:
            steps.append(v2.RandomGrayscale(cfg.grayscale_p))
        elif name == "blur" and blur_p > 0:
            blur = v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))
            steps.append(v2.RandomApply([blur], p=blur_p))
        elif name == "solarize" and solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))
    return steps

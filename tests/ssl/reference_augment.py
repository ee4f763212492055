"""The per-crop augmentation path openpluto used before the steps moved to the model's device.

Each float crop ``[3, S, S]`` in [0, 1] went through torchvision transforms (and three small modules)
in the loader worker, drawing from the global torch RNG. Kept here as the reference the batched path
(:mod:`openpluto.ssl.augment`) is tested against: same distributions, and the same numbers where the
parameters are the same.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.transforms import v2

from openpluto.ssl.config import AugmentConfig

_RGB_FROM_HED = torch.tensor(
    [[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], dtype=torch.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def rgb_to_hed(img: torch.Tensor) -> torch.Tensor:
    od = -torch.log(img.clamp(min=1.0 / 255.0))
    return torch.einsum("chw,cd->dhw", od, _HED_FROM_RGB.to(img.dtype))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    od = torch.einsum("dhw,dc->chw", hed, _RGB_FROM_HED.to(hed.dtype))
    return torch.exp(-od).clamp(0.0, 1.0)


def hed_jitter(img: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One crop ``[3, H, W]`` with stain factors ``alpha``/``beta`` ``[3]``."""
    return hed_to_rgb(rgb_to_hed(img) * alpha.view(3, 1, 1) + beta.view(3, 1, 1))


def hue_rotation_matrix(shift: float) -> torch.Tensor:
    angle = 2.0 * math.pi * shift
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ


def hue_rotate(img: torch.Tensor, shift: float) -> torch.Tensor:
    return torch.einsum("dc,chw->dhw", hue_rotation_matrix(shift).to(img.dtype), img).clamp_(0.0, 1.0)


class RandomHEDJitter(nn.Module):
    def __init__(self, sigma: float, p: float):
        super().__init__()
        self.sigma, self.p = sigma, p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or self.sigma <= 0 or torch.rand(()) >= self.p:
            return img
        alpha = 1.0 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.sigma
        return hed_jitter(img.float(), alpha, beta)


class RandomRot90(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return img
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(img, k, dims=(-2, -1)) if k else img


class RandomHue(nn.Module):
    def __init__(self, hue: float):
        super().__init__()
        self.hue = hue

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.hue <= 0:
            return img
        return hue_rotate(img, (float(torch.rand(())) * 2 - 1) * self.hue)


def build_steps(cfg: AugmentConfig, kind: int | str) -> v2.Compose:
    """The per-crop steps of one crop kind (``0``/``1`` global, ``"local"``) as one transform."""
    if kind == "local":
        blur_p, solarize_p = cfg.blur_p_local, cfg.solarize_p_local
    else:
        blur_p, solarize_p = cfg.blur_p[min(int(kind), 1)], cfg.solarize_p[min(int(kind), 1)]
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
    return v2.Compose(steps)

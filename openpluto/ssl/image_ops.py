"""Batched image operations behind the augmentation steps, on float RGB ``[N, 3, H, W]`` in [0, 1].

Per-image parameters are tensors with N rows; everything runs on the images' device without host
synchronisation (constant matrices are made once per device). Each operation computes what the
per-crop torchvision transform of the same name computes (tested against it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Ruifrok & Johnston (2001) stain optical-density vectors (rows: haematoxylin, eosin, DAB), normalised.
_RGB_FROM_HED = torch.tensor(
    [[0.650, 0.704, 0.286],
     [0.072, 0.990, 0.105],
     [0.268, 0.570, 0.776]], dtype=torch.float64
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1.0 / 255.0

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)

# Ids of the three ColorJitter operations (``color_order`` in the augmentation parameters).
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without stalling the host: through pinned memory to a GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def _mix_channels(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``out[n, d] = sum_c x[n, c] * m[..., c, d]`` for ``x [N, 3, H, W]`` (or ``[3, H, W]``).

    ``m`` is one ``[3, 3]`` matrix or one per image ``[N, 3, 3]``; one batched matmul, which gives every
    image the same arithmetic whatever the batch it is in.
    """
    flat = x.reshape(*x.shape[:-2], -1)  # [..., 3, H*W]
    return torch.matmul(m.transpose(-1, -2).to(x.dtype), flat).view(x.shape)


_MATRICES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _hed_matrix(m: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A float32 copy of a stain matrix on ``device``, made once per device."""
    key = (id(m), device)
    if key not in _MATRICES:
        _MATRICES[key] = to_device(m.float(), device)
    return _MATRICES[key]


def rgb_to_hed(img: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ``[..., 3, H, W]`` -> stain concentrations (H, E, D) in optical density, same shape."""
    od = img.clamp(min=_OD_FLOOR).log_().neg_()
    return _mix_channels(od, _hed_matrix(_HED_FROM_RGB, img.device))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed`, clamped to [0, 1]."""
    od = _mix_channels(hed, _hed_matrix(_RGB_FROM_HED, hed.device))
    return od.neg_().exp_().clamp_(0.0, 1.0)


def hed_jitter(img: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` RGB with per-image stain factors ``scale``/``shift`` ``[N, 3]``: s' = s*a + b."""
    hed = rgb_to_hed(img)
    return hed_to_rgb(hed * scale[:, :, None, None] + shift[:, :, None, None])


def hue_rotation_matrix(shift: float | torch.Tensor) -> torch.Tensor:
    """RGB -> RGB matrices rotating hue by ``shift`` turns (e.g. 0.02 = 7.2°) in YIQ space.

    A float gives one ``[3, 3]`` matrix; a tensor of shifts ``[N]`` gives ``[N, 3, 3]``.
    Applied as ``rgb' = M @ rgb``.
    """
    angle = 2.0 * math.pi * torch.as_tensor(shift, dtype=torch.float32)
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], dim=-1).view(*angle.shape, 3, 3)
    return _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """Luma ``[..., 1, H, W]`` of RGB ``[..., 3, H, W]`` (torchvision's rgb_to_grayscale arithmetic)."""
    r, g, b = img.unbind(-3)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def color_jitter(img: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation of ``[N, 3, H, W]`` in [0, 1], in a per-image order.

    ``factors [N, 3]`` (brightness, contrast, saturation), ``order [N, 3]`` the operation ids in the
    order applied. Each operation is torchvision's blend of the image with ``ref``, clamped to [0, 1]:
    ``ref`` is 0 (brightness), the mean luma of the image (contrast) or the pixel's luma (saturation),
    so the three ops of one position run as one batched ``lerp(ref, x, f)``.
    """
    for j in range(order.shape[1]):
        op = order[:, j]
        f = factors.gather(1, op[:, None]).view(-1, 1, 1, 1)
        gray = grayscale(img)
        mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
        op = op.view(-1, 1, 1, 1)
        ref = torch.where(op == SATURATION, gray, torch.where(op == CONTRAST, mean, torch.zeros_like(mean)))
        img = torch.lerp(ref.expand_as(img), img, f).clamp_(0.0, 1.0)
    return img


def hue_rotate(img: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` times per-image :func:`hue_rotation_matrix` ``[N, 3, 3]``, clamped to [0, 1]."""
    return _mix_channels(img, matrices.to(img.dtype).transpose(-1, -2)).clamp_(0.0, 1.0)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels ``[N, size]`` for ``sigma [N]`` px (torchvision's sampling)."""
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(-(x / sigma.clamp(min=1e-6)[:, None]).pow(2), dim=-1)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with one σ per image (``sigma [N]``), reflect padding."""
    n, c, h, w = img.shape
    k = gaussian_kernels(sigma.to(img.dtype), size).repeat_interleave(c, dim=0)  # [N*C, size]
    pad = size // 2
    x = F.pad(img.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(n * c, 1, 1, size), groups=n * c)  # along W
    x = F.conv2d(x, k.view(n * c, 1, size, 1), groups=n * c)  # along H
    return x.view(n, c, h, w)


def solarize(img: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert values >= ``threshold`` (float images in [0, 1])."""
    return torch.where(img >= threshold, 1.0 - img, img)

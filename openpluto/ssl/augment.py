"""Histology augmentations: drawn per crop in the loader workers, applied batched where the model runs.

Split of the work:

- a loader worker cuts each random-resized crop as uint8 and draws the random parameters of every
  step for it with :func:`draw_params` (from the sample's RNG, seeded by (seed, stream position), so a
  view depends on nothing else: not on the device, the number of workers or a restart);
- :class:`BatchAugment` applies the steps to the collated uint8 batch on the model's device (the GPU
  for GPU training, the same code on CPU), converts to float32 in [0, 1] and normalises. Nothing
  random happens there.

The steps of :class:`~openpluto.ssl.config.AugmentConfig` ``steps`` run in that order, each drawn as the
per-crop torchvision transform it replaces (same distributions, tested against it):

- ``flip``: horizontal and vertical flips, each with ``flip_p``.
- ``rot90``: rotation by k*90°, k uniform in {0, 1, 2, 3}, with ``rot90_p`` (tissue has no "up").
- ``hed``: HED stain jitter (Tellez et al., "Whole-slide mitosis detection in H&E breast histology
  using PHH3 as a reference", IEEE TMI 2018), with ``hed_p``: RGB -> optical density ->
  haematoxylin/eosin/DAB concentrations (Ruifrok & Johnston 2001 stain vectors), each scaled by
  U(1-σ, 1+σ) and shifted by U(-σ, σ), and back.
- ``color``: with ``color_p``, brightness, contrast and saturation factors U(1-x, 1+x) applied in a
  random order (torchvision ``ColorJitter``), then a hue rotation by U(-hue, hue) turns: a rotation of
  the chroma plane in YIQ space (one 3x3 matrix, the same as an HSV round trip for the small shifts
  used on H&E).
- ``grayscale``: 3-channel grayscale (ITU-R 601 luma) with ``grayscale_p``.
- ``blur``: Gaussian blur (``blur_kernel`` taps, σ ~ U(``blur_sigma``), reflect padding), probability
  per crop kind (DINOv2: 1.0 / 0.1 global, 0.5 local).
- ``solarize``: invert values >= 0.5, probability per crop kind (DINOv2: 0 / 0.2 global).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)

# Ids of the three ColorJitter operations in ``color_order``.
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2

# Per-crop parameters drawn by :func:`draw_params`: name -> (dtype, trailing shape).
PARAM_SPECS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "flip_h": (torch.bool, ()),
    "flip_v": (torch.bool, ()),
    "rot90": (torch.int64, ()),  # k in 0..3 (0: not rotated)
    "hed": (torch.bool, ()),
    "hed_scale": (torch.float32, (3,)),
    "hed_shift": (torch.float32, (3,)),
    "color": (torch.bool, ()),
    "brightness": (torch.float32, ()),
    "contrast": (torch.float32, ()),
    "saturation": (torch.float32, ()),
    "color_order": (torch.int64, (3,)),  # BRIGHTNESS/CONTRAST/SATURATION in the order applied
    "hue": (torch.float32, ()),  # turns
    "grayscale": (torch.bool, ()),
    "blur": (torch.bool, ()),
    "blur_sigma": (torch.float32, ()),  # px
    "solarize": (torch.bool, ()),
}


# ---------------------------------------------------------------------------------------- colour math


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


# ---------------------------------------------------------------------------------------- draws


def _kind_probs(cfg: AugmentConfig, kind: int | str) -> tuple[float, float]:
    """(blur_p, solarize_p) of a crop kind: ``0``/``1`` (first/second global crop) or ``"local"``.
    Global crops after the second use the second's probabilities."""
    if kind == "local":
        return cfg.blur_p_local, cfg.solarize_p_local
    i = min(int(kind), 1)
    return cfg.blur_p[i], cfg.solarize_p[i]


def _factor_range(x: float) -> tuple[float, float]:
    """torchvision ColorJitter's factor range for strength ``x``: U(max(0, 1-x), 1+x)."""
    return max(0.0, 1.0 - x), 1.0 + x


def draw_params(
    cfg: AugmentConfig, kinds: Sequence[int | str], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Random parameters of every step for one crop per entry of ``kinds`` (see :data:`PARAM_SPECS`).

    Every crop takes the same fixed number of uniform draws from ``generator`` (the global torch RNG
    if None), so the draws of a sample depend only on the RNG state; they are turned into parameters
    with numpy (a worker does this for every sample, so few small torch calls). A step missing from
    ``cfg.steps`` or with probability 0 gets its flag False for every crop.
    """
    n = len(kinds)
    on = set(cfg.steps)
    u = torch.rand(n, 23, generator=generator, dtype=torch.float64).numpy()
    blur_p, solarize_p = np.array([_kind_probs(cfg, k) for k in kinds], dtype=np.float64).reshape(n, 2).T

    def flag(col: int, p: float | np.ndarray, step: str) -> np.ndarray:
        return (u[:, col] < p) & (step in on)

    def uniform(cols: int | slice, lo: float, hi: float) -> np.ndarray:
        return (lo + (hi - lo) * u[:, cols]).astype(np.float32)

    s = cfg.hed_sigma
    rot = np.where(flag(2, cfg.rot90_p, "rot90"), np.minimum((u[:, 3] * 4).astype(np.int64), 3), 0)
    out = {
        "flip_h": flag(0, cfg.flip_p, "flip"),
        "flip_v": flag(1, cfg.flip_p, "flip"),
        "rot90": rot,
        "hed": flag(4, cfg.hed_p, "hed") & (s > 0),
        "hed_scale": uniform(slice(14, 17), 1.0 - s, 1.0 + s),
        "hed_shift": uniform(slice(17, 20), -s, s),
        "color": flag(5, cfg.color_p, "color"),
        "brightness": uniform(6, *_factor_range(cfg.brightness)),
        "contrast": uniform(7, *_factor_range(cfg.contrast)),
        "saturation": uniform(8, *_factor_range(cfg.saturation)),
        "color_order": np.argsort(u[:, 20:23], axis=1),  # a uniformly random order of the three
        "hue": uniform(9, -cfg.hue, cfg.hue),
        "grayscale": flag(10, cfg.grayscale_p, "grayscale"),
        "blur": flag(11, blur_p, "blur"),
        "blur_sigma": uniform(12, *cfg.blur_sigma),
        "solarize": flag(13, solarize_p, "solarize"),
    }
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=_NP_DTYPES[PARAM_SPECS[k][0]]))
            for k, v in out.items()}


_NP_DTYPES = {torch.bool: np.bool_, torch.int64: np.int64, torch.float32: np.float32}


# ---------------------------------------------------------------------------------------- batched steps


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without stalling the host: through pinned memory to a GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def _on_subset(x: torch.Tensor, select: torch.Tensor, fn: Callable, *per_image: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(x[select], *[a[select]])`` to the images where ``select`` (a CPU bool ``[N]``) holds.

    The index list is made on the CPU (no device sync); ``per_image`` arguments travel with it.
    """
    count = int(select.sum())
    if count == 0:
        return x
    if count == select.numel():
        return fn(x, *[to_device(a, x.device) for a in per_image])
    idx = select.nonzero().flatten()
    idx_dev = to_device(idx, x.device)
    out = fn(x.index_select(0, idx_dev), *[to_device(a[idx], x.device) for a in per_image])
    return x.index_copy_(0, idx_dev, out)


def _flip(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    x = _on_subset(x, p["flip_h"], lambda t: t.flip(-1))
    return _on_subset(x, p["flip_v"], lambda t: t.flip(-2))


def _rot90(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    for k in (1, 2, 3):
        x = _on_subset(x, p["rot90"] == k, lambda t, k=k: torch.rot90(t, k, dims=(-2, -1)))
    return x


def _hed(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    return _on_subset(x, p["hed"], hed_jitter, p["hed_scale"], p["hed_shift"])


def _color(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    factors = torch.stack([p["brightness"], p["contrast"], p["saturation"]], dim=1)
    hue = hue_rotation_matrix(p["hue"])  # [N, 3, 3], made on the CPU

    def jitter(t, f, order, m):
        t = color_jitter(t, f, order)
        return hue_rotate(t, m) if cfg.hue > 0 else t

    return _on_subset(x, p["color"], jitter, factors, p["color_order"], hue)


def _grayscale(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    return _on_subset(x, p["grayscale"], lambda t: grayscale(t).expand_as(t).contiguous())


def _blur(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    return _on_subset(x, p["blur"], lambda t, s: gaussian_blur(t, s, cfg.blur_kernel), p["blur_sigma"])


def _solarize(x: torch.Tensor, p: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    return _on_subset(x, p["solarize"], solarize)


STEP_FUNCTIONS: dict[str, Callable] = {
    "flip": _flip,
    "rot90": _rot90,
    "hed": _hed,
    "color": _color,
    "grayscale": _grayscale,
    "blur": _blur,
    "solarize": _solarize,
}


def apply_steps(crops: torch.Tensor, params: dict[str, torch.Tensor], cfg: AugmentConfig) -> torch.Tensor:
    """uint8 (or float in [0, 1]) crops ``[N, 3, S, S]`` -> augmented float32 in [0, 1], same device.

    ``params`` are CPU tensors with N rows (:func:`draw_params`, stacked); crops stay where they are.
    """
    if crops.dtype == torch.uint8:
        x = crops.to(torch.float32).mul_(1.0 / 255.0)  # torchvision ToDtype(float32, scale=True)
    else:
        x = crops.to(torch.float32, copy=True)
    if x.shape[0] == 0:
        return x
    for name in cfg.steps:
        x = STEP_FUNCTIONS[name](x, params, cfg)
    return x


class BatchAugment:
    """Apply the augmentation steps to a collated multi-crop batch on the model's device, and normalise.

    ``BatchAugment(cfg.augment, mean, std)(batch, device)`` takes the batch of
    :func:`~openpluto.ssl.multicrop.collate_multicrop` (uint8 crops + per-crop parameters on the CPU,
    pinned by the DataLoader on GPU runs) and returns a new dict with float32 ``global_crops``
    ``[n_global*B, 3, G, G]`` and ``local_crops`` ``[n_local*B, 3, L, L]`` on ``device``, normalised
    with ``mean``/``std`` (0..1 RGB statistics); other entries (``batch_size``, ``masks``, ...) are
    passed through. Deterministic: the same batch gives the same views.
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float]):
        cfg.validate()
        self.cfg = cfg
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def views(self, crops: torch.Tensor, params: dict[str, torch.Tensor], device: torch.device
              ) -> torch.Tensor:
        """Augmented, normalised float32 views of one crop group (all global or all local crops)."""
        if device not in self._stats:
            self._stats[device] = (to_device(self.mean, device), to_device(self.std, device))
        mean, std = self._stats[device]
        return apply_steps(to_device(crops, device), params, self.cfg).sub_(mean).div_(std)

    def __call__(self, batch: dict, device: torch.device | str | None = None) -> dict:
        device = torch.device(device) if device is not None else batch["global_crops"].device
        out = {k: v for k, v in batch.items() if k not in ("global_params", "local_params")}
        out["global_crops"] = self.views(batch["global_crops"], batch["global_params"], device)
        out["local_crops"] = self.views(batch["local_crops"], batch["local_params"], device)
        return out

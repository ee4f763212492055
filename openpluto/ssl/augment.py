"""Histology augmentations: drawn per crop in the loader workers, applied batched where the model runs.

Split of the work:

- a loader worker cuts each random-resized crop as uint8 and draws the random parameters of every
  step for it with :func:`draw_params` (from the sample's RNG, seeded by (seed, stream position), so a
  view depends on nothing else: not on the device, the number of workers or a restart);
- :class:`BatchAugment` applies the steps to the collated uint8 batch on the model's device (the GPU
  for GPU training, the same code on CPU), converts to float32 in [0, 1] and normalises. Nothing
  random happens there; the tensor operations live in :mod:`openpluto.ssl.image_ops`.

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

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from openpluto.ssl.config import AugmentConfig
from openpluto.ssl.image_ops import (
    color_jitter,
    gaussian_blur,
    grayscale,
    hed_jitter,
    hue_rotate,
    hue_rotation_matrix,
    solarize,
    to_device,
)

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


def _on_subset(x: torch.Tensor, select: torch.Tensor, fn: Callable, *per_image: torch.Tensor
               ) -> torch.Tensor:
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
    factors = torch.stack([p["brightness"], p["contrast"], p["saturation"]], dim=1)  # image_ops' op ids
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
        with _one_cpu_thread(device):
            out["global_crops"] = self.views(batch["global_crops"], batch["global_params"], device)
            out["local_crops"] = self.views(batch["local_crops"], batch["local_params"], device)
        return out


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On the CPU, run the many small augmentation ops on one thread: a second thread buys little
    for ops of a few hundred thousand values, and on a busy machine every parallel region can wait a
    whole scheduler slice for it (measured: 570 ms instead of 20 ms per cpu-tiny batch at load 14)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""Typed settings of the self-supervised objective: views, masks, heads and losses.

Defaults are small and CPU-friendly (``cpu-tiny`` pretraining learns in minutes on 2 cores); the
DINOv2 ViT-g/14 values are given next to each field and collected in :meth:`SSLConfig.dinov2_like`,
which the large presets (``pluto4s``, ``pluto4g``) follow.

Sizes are in pixels; every crop size must be divisible by every patch size the backbone may use in a
step (FlexiViT 8/16/32 -> global 224 and local 96 work, 98 does not). :meth:`SSLConfig.check_patch_sizes`
raises :class:`~openpluto.errors.ConfigError` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from openpluto.errors import ConfigError

AUGMENT_STEPS = ("flip", "rot90", "hed", "color", "grayscale", "blur", "solarize")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"config key '{name}' is a probability and must be in [0, 1], got {p}")


def _check_range(name: str, lo_hi: tuple[float, float], lo: float = 0.0, hi: float = math.inf) -> None:
    if len(lo_hi) != 2 or not lo <= lo_hi[0] <= lo_hi[1] <= hi:
        raise ConfigError(f"config key '{name}' must be two increasing numbers in [{lo}, {hi}], got {lo_hi}")


@dataclass
class AugmentConfig:
    """Histology augmentations applied to every crop, in the order of ``steps``.

    A step is skipped when it is missing from ``steps`` or its probability is 0. Tuples of two values
    are (first global crop, second global crop); local crops use the ``*_local`` value.
    Geometry (flips, 90° rotations) is label-free for tissue, so it is on by default; colour steps
    are tuned for H&E: small hue/saturation shifts plus HED stain jitter (Tellez et al. 2018).
    """

    steps: tuple[str, ...] = AUGMENT_STEPS
    flip_p: float = 0.5  # DINOv2: horizontal flip 0.5 (no vertical / rot90: natural images)
    rot90_p: float = 1.0  # rotate by k*90°, k uniform in {0,1,2,3} (applied with this probability)
    hed_p: float = 0.5  # HED stain jitter (not in DINOv2)
    hed_sigma: float = 0.05  # per-stain s' = s*U(1-σ,1+σ) + U(-σ,σ) in optical density
    color_p: float = 0.8  # DINOv2: 0.8
    brightness: float = 0.2  # DINOv2: 0.4
    contrast: float = 0.2  # DINOv2: 0.4
    saturation: float = 0.1  # DINOv2: 0.2
    hue: float = 0.02  # DINOv2: 0.1 (too much for H&E)
    grayscale_p: float = 0.2  # DINOv2: 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # DINOv2: (1.0, 0.1)
    blur_p_local: float = 0.5  # DINOv2: 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # DINOv2: (0.1, 2.0), kernel 9
    blur_kernel: int = 9
    solarize_p: tuple[float, float] = (0.0, 0.2)  # DINOv2: (0.0, 0.2)
    solarize_p_local: float = 0.0

    def validate(self) -> None:
        unknown = [s for s in self.steps if s not in AUGMENT_STEPS]
        if unknown:
            raise ConfigError(
                f"config key 'crops.augment.steps' has unknown step '{unknown[0]}' "
                f"(known: {', '.join(AUGMENT_STEPS)})"
            )
        probs = ("flip_p", "rot90_p", "hed_p", "color_p", "grayscale_p", "blur_p_local", "solarize_p_local")
        for name in probs:
            _check_prob(f"crops.augment.{name}", getattr(self, name))
        for name in ("blur_p", "solarize_p"):
            for p in getattr(self, name):
                _check_prob(f"crops.augment.{name}", p)
        if len(self.blur_p) != 2 or len(self.solarize_p) != 2:
            raise ConfigError("config keys 'crops.augment.blur_p' and 'solarize_p' take two values "
                              "(first, second global crop)")
        _check_range("crops.augment.blur_sigma", self.blur_sigma, 0.0)
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ConfigError(
                f"config key 'crops.augment.blur_kernel' must be odd and >= 1, got {self.blur_kernel}")
        for name in ("hed_sigma", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key 'crops.augment.{name}' must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"config key 'crops.augment.hue' must be in [0, 0.5], got {self.hue}")


@dataclass
class CropConfig:
    """Multi-crop views of one tile: ``n_global`` large and ``n_local`` small random-resized crops."""

    global_size: int = 64  # DINOv2: 224 (PLUTO-4G patch 14: 224)
    local_size: int = 32  # DINOv2: 96 (98 for patch 14)
    n_global: int = 2  # DINOv2: 2
    n_local: int = 4  # DINOv2: 8
    global_scale: tuple[float, float] = (0.32, 1.0)  # DINOv2: (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)  # DINOv2: (0.05, 0.32)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if self.global_size < 1 or self.local_size < 1:
            raise ConfigError("config keys 'crops.global_size' and 'crops.local_size' must be >= 1")
        if self.n_global < 1:
            raise ConfigError(f"config key 'crops.n_global' must be >= 1, got {self.n_global}")
        if self.n_local < 0:
            raise ConfigError(f"config key 'crops.n_local' must be >= 0, got {self.n_local}")
        _check_range("crops.global_scale", self.global_scale, 0.0, 1.0)
        _check_range("crops.local_scale", self.local_scale, 0.0, 1.0)
        if self.global_scale[1] <= 0 or self.local_scale[1] <= 0:
            raise ConfigError("config keys 'crops.global_scale'/'crops.local_scale' need a maximum > 0")
        self.augment.validate()

    def check_patch_sizes(self, patch_sizes: tuple[int, ...] | list[int]) -> None:
        """Raise ConfigError unless both crop sizes are divisible by every patch size in use."""
        for p in patch_sizes:
            for name, size in (("global_size", self.global_size), ("local_size", self.local_size)):
                if name == "local_size" and self.n_local == 0:
                    continue
                if int(p) < 1 or size % int(p):
                    good = math.lcm(*[int(q) for q in patch_sizes])
                    raise ConfigError(
                        f"config key 'crops.{name}' = {size} is not divisible by patch size {p} "
                        f"(patch sizes in use: {list(patch_sizes)}; use a multiple of {good})"
                    )


@dataclass
class MaskConfig:
    """iBOT block masking of the student's global crops (as DINOv2)."""

    ratio_min_max: tuple[float, float] = (0.1, 0.5)  # DINOv2: (0.1, 0.5), stratified over masked images
    sample_probability: float = 0.5  # DINOv2: 0.5 -- share of global crops that get a mask
    min_num_patches: int = 4  # DINOv2: 4 -- smallest block
    max_block_share: float = 0.5  # DINOv2: 0.5 -- largest block as a share of the grid
    min_aspect: float = 0.3  # DINOv2: 0.3 (max aspect 1/0.3)

    def validate(self) -> None:
        _check_range("masks.ratio_min_max", self.ratio_min_max, 0.0, 1.0)
        _check_prob("masks.sample_probability", self.sample_probability)
        if self.min_num_patches < 1:
            raise ConfigError(f"config key 'masks.min_num_patches' must be >= 1, got {self.min_num_patches}")
        if not 0 < self.max_block_share <= 1:
            raise ConfigError(
                f"config key 'masks.max_block_share' must be in (0, 1], got {self.max_block_share}")
        if not 0 < self.min_aspect <= 1:
            raise ConfigError(f"config key 'masks.min_aspect' must be in (0, 1], got {self.min_aspect}")


@dataclass
class HeadConfig:
    """DINO / iBOT projection heads: MLP -> bottleneck -> L2-normalise -> prototypes."""

    out_dim: int = 1024  # DINOv2: 65536 prototypes
    hidden_dim: int = 256  # DINOv2: 2048
    bottleneck_dim: int = 64  # DINOv2: 256 (384 for the iBOT head)
    n_layers: int = 3  # DINOv2: 3
    ibot_separate_head: bool = False  # DINOv2 default: False (shared head)
    ibot_out_dim: int = 1024  # used only with a separate head; DINOv2: 65536
    ibot_hidden_dim: int = 256  # DINOv2: 2048
    ibot_bottleneck_dim: int = 64  # DINOv2: 256

    def validate(self) -> None:
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "n_layers", "ibot_out_dim",
                     "ibot_hidden_dim", "ibot_bottleneck_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'heads.{name}' must be >= 1, got {getattr(self, name)}")


@dataclass
class LossConfig:
    """Weights and temperatures of the DINO, iBOT and KoLeo terms (teacher temp comes from the schedule)."""

    dino_weight: float = 1.0  # DINOv2: 1.0
    dino_global: bool = True  # also match student global crop i to teacher global crop j != i (DINOv2: yes)
    ibot_weight: float = 1.0  # DINOv2: 1.0
    koleo_weight: float = 0.1  # DINOv2 / PLUTO-4: 0.1
    student_temp: float = 0.1  # DINOv2: 0.1
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"  # DINOv2: sinkhorn_knopp
    sinkhorn_iterations: int = 3  # DINOv2: 3
    center_momentum: float = 0.9  # softmax centering EMA; DINOv2: 0.9

    def validate(self) -> None:
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key 'loss.{name}' must be >= 0, got {getattr(self, name)}")
        if self.student_temp <= 0:
            raise ConfigError(f"config key 'loss.student_temp' must be > 0, got {self.student_temp}")
        if self.sinkhorn_iterations < 1:
            raise ConfigError(
                f"config key 'loss.sinkhorn_iterations' must be >= 1, got {self.sinkhorn_iterations}")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ConfigError(
                f"config key 'loss.center_momentum' must be in [0, 1), got {self.center_momentum}")


@dataclass
class SSLConfig:
    """All settings of the DINOv2-style objective (views, masks, heads, losses)."""

    crops: CropConfig = field(default_factory=CropConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def validate(self) -> None:
        self.crops.validate()
        self.masks.validate()
        self.heads.validate()
        self.loss.validate()

    def check_patch_sizes(self, patch_sizes: tuple[int, ...] | list[int]) -> None:
        """Raise ConfigError unless the crop sizes are divisible by every patch size in ``patch_sizes``."""
        self.crops.check_patch_sizes(patch_sizes)

    def uses_ibot(self) -> bool:
        """Whether the iBOT term is on (a weight and a masked share above 0)."""
        return self.loss.ibot_weight > 0 and self.masks.sample_probability > 0

    @classmethod
    def dinov2_like(cls, patch_size: int = 16) -> SSLConfig:
        """DINOv2's sizes (224/96 crops, 8 local, 65536 prototypes; 224/98 for patch 14)."""
        local = 98 if patch_size in (7, 14) else 96
        return cls(
            crops=CropConfig(global_size=224, local_size=local, n_global=2, n_local=8,
                             augment=AugmentConfig()),
            masks=MaskConfig(),
            heads=HeadConfig(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, ibot_out_dim=65536,
                             ibot_hidden_dim=2048, ibot_bottleneck_dim=256),
            loss=LossConfig(),
        )

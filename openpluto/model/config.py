"""``ModelConfig``: every setting of a PlutoViT backbone, with YAML presets in ``presets/``.

A preset holds only the fields that differ from the defaults below, e.g. ``presets/pluto4s.yaml``.
``load_model_config("pluto4s", overrides={"num_registers": 4})`` applies defaults <- preset <- overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openpluto.config import list_presets, load_config
from openpluto.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How openpluto resizes images for an encoder at inference (`embed-images`, `eval`; slide tiles are read
# with the same filter): antialiased bilinear, as eva's ResizeAndCrop (torchvision's default). Exported
# timm configs state it, so timm/eva pipelines built from them resize the same way.
RESIZE_INTERPOLATION = "bilinear"


@dataclass
class ModelConfig:
    """A ViT backbone: FlexiViT patch sizes, RoPE or learned positions, registers, MLP or SwiGLU FFN."""

    name: str = field(default="custom", metadata={"help": "preset / model name (recorded in outputs)"})
    img_size: int = field(default=224, metadata={"help": "reference input size in px (learned pos table)"})
    patch_size: int = field(default=16, metadata={"help": "default patch size in px"})
    patch_sizes: tuple[int, ...] = field(default=(16,), metadata={"help": "patch sizes the model runs at"})
    patch_kernel_size: int | None = field(
        default=None,
        metadata={"help": "size of the one stored patch kernel, PI-resized to each patch size "
                  "(default: the smallest patch size, so every resize is an exact upsampling)"},
    )
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = field(default=4.0, metadata={"help": "FFN width / embed_dim (per SwiGLU branch)"})
    ffn: Literal["mlp", "swiglu"] = "mlp"
    qkv_bias: bool = True
    num_registers: int = 0
    pos_embed: Literal["rope", "learned"] = "rope"
    rope_temperature: float = field(default=100.0, metadata={"help": "RoPE period base (DINOv3: 100)"})
    rope_rescale_coords: float | None = field(
        default=None, metadata={"help": "train-time RoPE coordinate rescale R (DINOv3: 2); none = off"})
    layerscale_init: float | None = field(default=1e-5, metadata={"help": "LayerScale init; none = off"})
    drop_path_rate: float = 0.0
    attn_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = field(
        default="auto", metadata={"help": "SDPA backend tried first (auto: PyTorch's choice); "
                                  "same maths, only speed differs"})
    norm_eps: float | None = field(
        default=None, metadata={"help": "LayerNorm eps; none: 1e-5 rope (DINOv3), 1e-6 learned"})
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def kernel_size(self) -> int:
        """Side of the stored patch-embedding kernel in px."""
        return self.patch_kernel_size or min(self.patch_sizes)

    @property
    def eps(self) -> float:
        """The LayerNorm eps actually used."""
        if self.norm_eps is not None:
            return self.norm_eps
        return 1e-5 if self.pos_embed == "rope" else 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def validate(self) -> None:
        """Raise ConfigError (naming the key) if the fields do not describe a buildable model."""
        if not self.patch_sizes:
            raise ConfigError("config key 'patch_sizes' must list at least one patch size")
        if any(p <= 0 for p in self.patch_sizes):
            raise ConfigError(f"config key 'patch_sizes' must be positive, got {list(self.patch_sizes)}")
        if self.patch_size not in self.patch_sizes:
            raise ConfigError(
                f"config key 'patch_size' ({self.patch_size}) must be one of patch_sizes "
                f"{list(self.patch_sizes)}")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"config key 'img_size' ({self.img_size}) must be divisible by patch_size "
                f"({self.patch_size})")
        if self.embed_dim <= 0 or self.depth <= 0 or self.num_heads <= 0:
            raise ConfigError("config keys 'embed_dim', 'depth', 'num_heads' must be positive")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"config key 'num_heads' ({self.num_heads}) must divide embed_dim ({self.embed_dim})")
        if self.pos_embed == "rope" and self.head_dim % 4:
            raise ConfigError(
                f"config key 'num_heads': 2D RoPE needs a head dim divisible by 4, got {self.head_dim}")
        if self.num_registers < 0:
            raise ConfigError("config key 'num_registers' must be >= 0")
        if self.patch_kernel_size is not None and self.patch_kernel_size <= 0:
            raise ConfigError("config key 'patch_kernel_size' must be positive")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(f"config keys 'mean'/'std' need {self.in_chans} values (one per channel)")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"config key 'drop_path_rate' must be in [0, 1), got {self.drop_path_rate}")


def list_model_presets() -> list[str]:
    """Names of the built-in model presets."""
    return list_presets(PRESETS_DIR)


def load_model_config(name_or_file: str | Path | None, overrides: dict[str, Any] | list[str] | None = None
                      ) -> ModelConfig:
    """Defaults <- preset (name in ``presets/`` or a YAML path) <- overrides (dict or ``key=value`` list)."""
    cfg = load_config(ModelConfig, name_or_file, PRESETS_DIR, overrides or {})
    return cfg

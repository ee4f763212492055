"""Settings of whole-slide embedding extraction (every ``openpluto embed`` flag is a field here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from openpluto.errors import ConfigError


@dataclass
class EmbedConfig:
    """Whole-slide embedding: tissue tiles at ``mpp`` µm/px -> one ``<slide>.h5`` per slide in ``out``."""

    inputs: list[str] = field(default_factory=list, metadata={"help": "slide files or folders of slides"})
    model: str = field(default="", metadata={"help": "openpluto model dir, timm:NAME:WEIGHTS, or a preset "
                                                     "name (random init, for tests/baselines)"})
    out: str = field(default="", metadata={"help": "output folder for <slide>.h5, errors.csv, pictures/"})
    mpp: float = field(default=0.5, metadata={"help": "target resolution of the tiles, µm/px"})
    tile_size: int = field(default=224, metadata={"help": "tile side in pixels at the target mpp"})
    patch_size: int | None = field(default=None, metadata={
        "help": "ViT patch size (8/16/32 for FlexiViT models; default: the model's default)"})
    pooling: Literal["cls", "cls+mean"] = field(default="cls", metadata={
        "help": "tile embedding: CLS token [D], or CLS + mean patch token [2D]"})
    batch_size: int = field(default=64, metadata={"help": "tiles per forward pass"})
    workers: int = field(default=2, metadata={
        "help": "reader processes shared by all slides of the run (tissue masks, tiles, pictures); 0 counts "
                "as 1: a slide is never read in the model's process"})
    dtype: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "compute dtype: auto = bf16 autocast on GPU, fp32 on CPU"})
    device: str = field(default="auto", metadata={
        "help": "auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)"})
    save_patch_tokens: bool = field(default=False, metadata={
        "help": "also store patch tokens [N, n_tokens, D] float16 (large!)"})
    min_tissue: float = field(default=0.5, metadata={
        "help": "minimum usable-tissue fraction of a tile, 0..1"})
    mpp_override: str | None = field(default=None, metadata={
        "help": "level-0 µm/px for slides with missing/wrong metadata: one value or a CSV slide,mpp"})
    allow_upsample: bool = field(default=False, metadata={
        "help": "allow targets finer than the scan (upsampled tiles; refused by default)"})
    recursive: bool = field(default=False, metadata={"help": "search input folders recursively"})
    pictures: bool = field(default=True, metadata={
        "help": "write pictures/<slide>_pc1.png (PC1 of the tile features over the thumbnail)"})
    overwrite: bool = field(default=False, metadata={
        "help": "recompute slides whose <slide>.h5 already exists"})
    max_tiles: int | None = field(default=None, metadata={
        "help": "embed at most this many tiles per slide (evenly spaced; for quick looks)"})
    seed: int = field(default=0, metadata={
        "help": "torch seed (makes random-init presets identical per run)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads of the main process"})
    reader: Literal["auto", "openslide"] = field(default="auto", metadata={
        "help": "auto: JPEG tiles of SVS/TIFF/NDPI pyramids read and decoded directly, OpenSlide for the "
                "other formats; openslide: always OpenSlide"})
    dct_scaling: bool = field(default=True, metadata={
        "help": "decode JPEG tiles at 1/2, 1/4 or 1/8 in the DCT domain when the target µm/px is that much "
                "coarser than a stored level (faster; within a few grey levels of decode + resize)"})
    timeout: float = field(default=900.0, metadata={
        "help": "seconds a reader process may spend on one job of a slide (planning it: open, tissue "
                "mask, grid; or reading one block of its tiles); past it that slide is abandoned"})
    shard: str | None = field(default=None, metadata={
        "help": "I/N: embed only shard I of N of the slides (default: from SLURM_ARRAY_TASK_ID/"
                "SLURM_ARRAY_TASK_COUNT; torchrun ranks split each shard further)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the encoder's blocks (faster on GPU after a warm-up of a minute or two)"})

    def validate(self) -> None:
        if self.mpp <= 0:
            raise ConfigError(f"config key 'mpp' must be > 0 µm/px, got {self.mpp}")
        if self.tile_size < 8:
            raise ConfigError(f"config key 'tile_size' must be >= 8 px, got {self.tile_size}")
        if self.patch_size is not None and (self.patch_size <= 0 or self.tile_size % self.patch_size):
            raise ConfigError(f"config key 'tile_size' ({self.tile_size}) must be divisible by "
                              f"'patch_size' ({self.patch_size})")
        if self.batch_size < 1:
            raise ConfigError(f"config key 'batch_size' must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"config key 'workers' must be >= 0, got {self.workers}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"config key 'min_tissue' must be in [0, 1], got {self.min_tissue}")
        if self.timeout <= 0:
            raise ConfigError(f"config key 'timeout' must be > 0 seconds, got {self.timeout}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ConfigError(f"config key 'max_tiles' must be >= 1, got {self.max_tiles}")

    def replace(self, **changes) -> EmbedConfig:
        """A copy with some fields changed (validated)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new


@dataclass
class PcaPictureConfig:
    """``openpluto embed-pca``: DINOv2-style PCA of patch tokens of one slide region, as a PNG."""

    slide: str = field(default="", metadata={"help": "slide file"})
    model: str = field(default="", metadata={
        "help": "openpluto model dir, timm:NAME:WEIGHTS or a preset name"})
    out: str = field(default="", metadata={"help": "output PNG"})
    mpp: float = field(default=0.5, metadata={"help": "µm/px of the region"})
    size: int = field(default=448, metadata={
        "help": "region side in px at mpp (divisible by the patch size)"})
    x: int | None = field(default=None, metadata={"help": "level-0 x of the region's top-left (default: the "
                                                          "most tissue-rich spot)"})
    y: int | None = field(default=None, metadata={"help": "level-0 y of the region's top-left"})
    patch_size: int | None = field(default=None, metadata={"help": "ViT patch size (default: the model's)"})
    foreground: bool = field(default=False, metadata={"help": "black out the background half of PC1 first"})
    mpp_override: str | None = field(default=None, metadata={
        "help": "level-0 µm/px: a value or CSV slide,mpp"})
    seed: int = field(default=0, metadata={"help": "torch seed (random-init presets)"})

    def validate(self) -> None:
        if self.mpp <= 0:
            raise ConfigError(f"config key 'mpp' must be > 0 µm/px, got {self.mpp}")
        if self.size < 8:
            raise ConfigError(f"config key 'size' must be >= 8 px, got {self.size}")

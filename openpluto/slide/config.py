"""Typed settings of the slide stage (every CLI flag of ``openpluto tissue`` / ``tiles`` is a field)."""

from __future__ import annotations

import dataclasses
from dataclasses import field

from openpluto.errors import ConfigError


@dataclasses.dataclass
class TissueConfig:
    """Tissue and artifact detection on a low-resolution thumbnail."""

    mask_mpp: float = field(
        default=2.0, metadata={"help": "µm/px of the tissue mask (coarser for big slides)"}
    )
    max_mask_size: int = field(default=2048, metadata={"help": "longest side of the mask in px"})
    min_od: float = field(default=0.06, metadata={"help": "lowest optical-density threshold (faint tissue)"})
    max_od: float = field(
        default=0.25, metadata={"help": "highest optical-density threshold (Otsu is capped)"}
    )
    min_saturation: float = field(
        default=0.08, metadata={"help": "saturation that marks faint stained tissue"}
    )
    close_um: float = field(default=12.0, metadata={"help": "morphological closing radius in µm"})
    min_region_um2: float = field(default=10000.0, metadata={"help": "drop tissue pieces smaller than this"})
    max_hole_um2: float = field(default=20000.0, metadata={"help": "fill holes in tissue smaller than this"})
    background: str = field(default="auto", metadata={"help": "auto | bright | dark (fluorescence)"})
    pen: bool = field(default=True, metadata={"help": "exclude pen marks (blue, green, black, red ink)"})
    blur: bool = field(default=True, metadata={"help": "exclude out-of-focus areas"})
    fold: bool = field(default=True, metadata={"help": "exclude tissue folds"})
    blur_cell_um: float = field(default=40.0, metadata={"help": "scale of the local sharpness measure in µm"})
    blur_rel: float = field(
        default=0.35, metadata={"help": "sharpness below this x the slide median is blur"}
    )
    fold_rel: float = field(default=1.9, metadata={"help": "optical density above this x the median is fold"})
    artifact_margin_um: float = field(default=10.0, metadata={"help": "grow artifact masks by this many µm"})

    def validate(self) -> None:
        if self.background not in ("auto", "bright", "dark"):
            raise ConfigError(
                f"config key 'background' must be auto, bright or dark, got {self.background!r}"
            )
        if self.mask_mpp <= 0 or self.max_mask_size < 64:
            raise ConfigError("config keys 'mask_mpp' must be > 0 and 'max_mask_size' >= 64")


@dataclasses.dataclass
class TilesConfig:
    """Multi-resolution tiling of usable tissue into WebDataset shards."""

    mpp: tuple[float, ...] = field(default=(0.25, 0.5, 1.0, 2.0), metadata={"help": "target µm/px"})
    tile_size: tuple[int, ...] = field(default=(275, 550), metadata={"help": "tile sizes in px"})
    min_tissue: float = field(
        default=0.5, metadata={"help": "keep tiles whose usable-tissue fraction >= this"}
    )
    overlap: float = field(default=0.0, metadata={"help": "grid overlap as a fraction of the tile"})
    tiles_per_slide: int = field(
        default=0,
        metadata={"help": "at most N tiles per slide at each mpp x size, sampled at random (0 = all)"},
    )
    shard_size: int = field(default=1000, metadata={"help": "tiles per WebDataset shard"})
    jpeg_quality: int = field(default=90, metadata={"help": "JPEG quality of the tiles"})
    workers: int = field(default=1, metadata={"help": "slides processed in parallel (processes)"})
    timeout: float = field(default=900.0, metadata={"help": "seconds per slide before it is abandoned"})
    allow_upsample: bool = field(default=False, metadata={"help": "allow targets finer than the scan"})
    mpp_override: str | None = field(
        default=None, metadata={"help": "µm/px for slides without it: a number or a CSV slide,mpp"}
    )
    seed: int = field(default=0, metadata={"help": "seed of tile sampling"})
    shard: str | None = field(
        default=None,
        metadata={"help": "I/N: tile only shard I of N of the slides (default: from SLURM_ARRAY_TASK_ID/"
                  "SLURM_ARRAY_TASK_COUNT and torchrun's RANK/WORLD_SIZE, else all)"},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "redo slides already tiled (also with other settings)"}
    )
    qc: bool = field(default=True, metadata={"help": "write QC overlay, mask PNG, GeoJSON and mosaics"})
    modality: str = field(
        default="brightfield",
        metadata={"help": "slides to tile: brightfield (H&E and IHC), he, ihc, fluorescence or any; the "
                  "others are left out with a notice"},
    )

    def validate(self) -> None:
        from openpluto.slide.tissue import MODALITY_CHOICES

        if self.modality not in MODALITY_CHOICES:
            raise ConfigError(
                f"config key 'modality' must be one of {', '.join(MODALITY_CHOICES)}, got {self.modality!r}"
            )
        if not self.mpp or any(m <= 0 for m in self.mpp):
            raise ConfigError(f"config key 'mpp' must be positive numbers, got {self.mpp}")
        if not self.tile_size or any(s < 8 for s in self.tile_size):
            raise ConfigError(f"config key 'tile_size' must be >= 8 px, got {self.tile_size}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"config key 'min_tissue' must be in [0, 1], got {self.min_tissue}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"config key 'overlap' must be in [0, 1), got {self.overlap}")
        if self.shard_size < 1 or self.workers < 1 or self.timeout <= 0:
            raise ConfigError("config keys 'shard_size', 'workers' must be >= 1 and 'timeout' > 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"config key 'jpeg_quality' must be in 1..100, got {self.jpeg_quality}")

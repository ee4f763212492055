"""Typed pretraining config: model preset + overrides, SSL objective, optimizer, schedules, data, dist, logs.

Presets live in ``openpluto/train/presets/*.yaml`` (``pluto4s``, ``pluto4g``, ``cpu-tiny``) and hold only
the fields that differ from these defaults. Every length is in optimizer steps (iterations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openpluto.config import load_config
from openpluto.errors import ConfigError
from openpluto.ssl import SSLConfig

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class OptimConfig:
    """AdamW and its parameter groups (lr is the peak for ``ref_batch_size`` images/step)."""

    base_lr: float = 4e-3
    ref_batch_size: int = 1024
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2


@dataclass
class ScheduleConfig:
    """Warm-ups and EMA schedules, in steps."""

    warmup_steps: int = 10_000
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_steps: int = 30_000
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    freeze_last_layer_steps: int = 1_250


@dataclass
class DataConfig:
    """Input: WebDataset shards (``*.tar`` found recursively) or an image folder."""

    path: str = ""
    batch_size: int = 32  # images per rank per micro-batch
    num_workers: int = 4
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "tif", "tiff", "webp")
    prefetch_factor: int = 2


@dataclass
class DistConfig:
    """Parallelism and memory/speed options (single process when not launched by torchrun)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: str | None = None  # nccl on GPU, gloo on CPU when None
    bucket_cap_mb: int = 360
    gradient_as_bucket_view: bool = True
    find_unused_parameters: bool = False
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False
    compile_blocks: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU


@dataclass
class LogConfig:
    """Logging and checkpointing cadence (rank 0 writes)."""

    log_every: int = 10
    checkpoint_every: int = 1000
    keep_every: int = 0  # also keep RUN/checkpoints/step_N.pt every N steps (0: only the latest)
    tensorboard: bool = True
    plot_every: int = 500
    progress: bool = True


@dataclass
class TrainConfig:
    """Everything a pretraining run needs; written to ``RUN/config.yaml``."""

    model: str = "vit_micro_flexi"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    patch_sizes: tuple[int, ...] | None = None  # None: the model's patch_sizes
    patch_size_probs: tuple[float, ...] | None = None
    max_steps: int = 1000
    # Wall-time limit (minutes since pretrain() started): stop cleanly at the first step boundary after
    # it, with a checkpoint. The schedules stay defined by max_steps, so the steps made are the same.
    max_minutes: float | None = None
    global_batch_size: int | None = None  # sets grad_accum_steps = global / (batch_size * world)
    seed: int = 0
    max_nonfinite_in_row: int = 20
    compile: bool = False  # torch.compile the backbone blocks (openpluto.model.maybe_compile); CLI --compile
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be > 0 (or null for no limit), got {self.max_minutes}")
        if self.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.data.batch_size}")
        if self.dist.grad_accum_steps < 1:
            raise ConfigError(f"dist.grad_accum_steps must be >= 1, got {self.dist.grad_accum_steps}")
        if self.patch_size_probs is not None and (
            self.patch_sizes is None or len(self.patch_size_probs) != len(self.patch_sizes)
        ):
            raise ConfigError("patch_size_probs needs patch_sizes of the same length (one weight per size)")
        if self.log.checkpoint_every < 1 or self.log.log_every < 1:
            raise ConfigError("log.checkpoint_every and log.log_every must be >= 1")
        if self.log.keep_every < 0:
            raise ConfigError(
                f"log.keep_every must be >= 0 (0: keep only the latest), got {self.log.keep_every}")

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step (from ``global_batch_size`` when set)."""
        if self.global_batch_size is None:
            return self.dist.grad_accum_steps
        per_step = self.data.batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not a multiple of data.batch_size "
                f"{self.data.batch_size} x {world_size} ranks; change data.batch_size or global_batch_size"
            )
        return self.global_batch_size // per_step


def load_train_config(
    name_or_file: str | Path | None, overrides: list[str] | dict | tuple = ()
) -> TrainConfig:
    """Defaults <- preset (name in ``presets/`` or a YAML file) <- ``key=value`` overrides."""
    return load_config(TrainConfig, name_or_file, PRESETS_DIR, overrides)

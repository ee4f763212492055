"""openpluto.train: the DINOv2-style pretraining loop around :mod:`openpluto.ssl`.

Config (presets ``cpu-tiny``, ``pluto4s``, ``pluto4g``), iteration schedules, AdamW parameter groups,
per-step patch sizes, deterministic resumable data, checkpoints, DDP/FSDP2 under torchrun, logs and the
teacher export. Entry points: :func:`pretrain`, :func:`export_teacher`, ``openpluto pretrain|export``.
"""

from openpluto.train.config import (
    DataConfig,
    DistConfig,
    LogConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    load_train_config,
)
from openpluto.train.export import export_teacher
from openpluto.train.patch_sizes import patch_size_for_step
from openpluto.train.schedules import Schedules
from openpluto.train.trainer import pretrain

__all__ = [
    "DataConfig",
    "DistConfig",
    "LogConfig",
    "OptimConfig",
    "ScheduleConfig",
    "Schedules",
    "TrainConfig",
    "export_teacher",
    "load_train_config",
    "patch_size_for_step",
    "pretrain",
]

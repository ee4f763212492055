"""One typed config per evaluation protocol, holding the published defaults (eva / HEST-1k).

Every field becomes a ``--flag`` of ``openpluto eval <protocol>`` (``add_config_args``) and is written
verbatim into the results JSON, so a result file alone says how to rerun it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from openpluto.errors import ConfigError

Pooling = Literal["cls", "cls+mean"]


def _positive(obj, *names: str) -> None:
    """ConfigError naming the first field that is not a positive number."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{name}' must be > 0, got {value}")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EmbedSettings:
    """How frozen image embeddings are made (shared by linear, kNN and segmentation)."""

    model: str | None = _f(
        None, "encoder: openpluto model dir, preset name (random init) or timm:NAME:WEIGHTS"
    )
    data: str | None = _f(None, "image folder (train/val/test/<class>/*) or CSV path,label[,split]")
    features: str | None = _f(
        None, "precomputed FILE.h5 from `openpluto embed-images` instead of --model/--data"
    )
    patch_size: int | None = _f(None, "encoder patch size (PLUTO-4S: 8, 16 or 32; default: the model's)")
    pooling: Pooling = _f("cls", "embedding: CLS token or CLS + mean patch token")
    resize: int = _f(224, "resize the shorter side to this many px, then centre-crop a square")
    batch_size_embed: int = _f(64, "images per encoder forward pass")
    workers: int = _f(0, "DataLoader worker processes for image decoding")
    device: str = _f("cpu", "torch device for the encoder and heads (cpu, cuda, cuda:1)")
    compile: bool = _f(False, "torch.compile the encoder's blocks (GPU speed-up after a warm-up)")
    cache_dir: str | None = _f(None, "feature cache folder (default: ~/.cache/openpluto/features)")
    val_fraction: float = _f(0.15, "validation share when the data has no split (seeded, stratified)")
    test_fraction: float = _f(0.15, "test share when the data has no split (seeded, stratified)")
    split_seed: int = _f(0, "seed of the stratified split made when the data has none")

    def validate(self) -> None:
        _positive(self, "resize", "batch_size_embed")
        if self.val_fraction <= 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("config keys 'val_fraction' (> 0) + 'test_fraction' (>= 0) must be < 1")


@dataclass
class LinearConfig(EmbedSettings):
    """eva linear probe: one linear layer on frozen embeddings."""

    runs: int = _f(5, "independent runs (head init and data order differ)")
    seed: int = _f(0, "base seed; run i uses seed + i")
    lr: float = _f(3e-4, "AdamW learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay (eva's configs leave torch's default, 0.01)")
    batch_size: int = _f(256, "training batch size")
    max_steps: int = _f(12_500, "maximum optimiser steps")
    val_every: int = _f(0, "validate every N steps (0: once per epoch = pass over the training set, as eva)")
    patience: int | None = _f(
        None, "stop after this many validations (epochs) without a better score (default: 20%% of the "
        "maximum epochs, as eva)"
    )
    warmup_epochs: int = _f(5, "epochs at the lower warm-up lr (eva: torch ConstantLR, 5 epochs)")
    warmup_factor: float = _f(1 / 3, "lr multiplier during warm-up (eva: torch ConstantLR, 1/3)")
    smooth: int = _f(
        5, "pick the checkpoint and stop early on the mean validation balanced accuracy of the last N "
        "validations (1: eva's rule; more keeps one lucky epoch on a small validation set from winning)"
    )
    out: str = _f("results/linear.json", "results JSON")
    task: str | None = _f(None, "task name for the table (default: data folder name)")

    def validate(self) -> None:
        super().validate()
        _positive(self, "runs", "lr", "batch_size", "max_steps", "patience", "smooth")
        if self.warmup_epochs < 0 or not 0 < self.warmup_factor <= 1:
            raise ConfigError("config keys 'warmup_epochs' must be >= 0 and 'warmup_factor' in (0, 1]")


@dataclass
class KnnConfig(EmbedSettings):
    """DINO's weighted k-nearest-neighbour classifier on frozen embeddings."""

    k: int = _f(20, "neighbours")
    temperature: float = _f(0.07, "softmax temperature of the cosine-similarity votes")
    out: str = _f("results/knn.json", "results JSON")
    task: str | None = _f(None, "task name for the table (default: data folder name)")

    def validate(self) -> None:
        super().validate()
        _positive(self, "k", "temperature")


@dataclass
class AbmilConfig:
    """eva's gated-attention ABMIL on slide feature bags."""

    features: str | None = _f(None, "folder of <slide>.h5 files (features [N,D], coords [N,2])")
    labels: str | None = _f(None, "CSV with columns slide,label,split (split: train/val/test)")
    runs: int = _f(20, "independent runs")
    seed: int = _f(0, "base seed; run i uses seed + i")
    projected_dim: int = _f(128, "input projection width")
    attention_dim: int = _f(128, "gated-attention hidden width")
    mlp_dims: tuple[int, ...] = _f((128, 64), "classifier MLP hidden widths")
    dropout: float = _f(0.0, "dropout in projection, attention and MLP")
    lr: float = _f(1e-3, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(32, "slides per batch (bags padded and masked)")
    max_epochs: int = _f(100, "maximum epochs")
    patience: int = _f(20, "stop after this many epochs without a better validation balanced accuracy")
    max_tiles: int | None = _f(None, "sample at most this many tiles per training bag (default: all)")
    device: str = _f("cpu", "torch device")
    out: str = _f("results/abmil.json", "results JSON")
    task: str | None = _f(None, "task name for the table (default: labels file name)")

    def validate(self) -> None:
        _positive(
            self,
            "runs",
            "lr",
            "batch_size",
            "max_epochs",
            "patience",
            "max_tiles",
            "projected_dim",
            "attention_dim",
        )


@dataclass
class SegmentationConfig:
    """eva-style ConvDecoderWithImage on the frozen patch-token map, Dice loss."""

    model: str | None = _f(
        None, "encoder: openpluto model dir, preset name (random init) or timm:NAME:WEIGHTS"
    )
    data: str | None = _f(None, "ROOT/{train,val,test}/{images,masks}/ (mask: PNG of class ids, same stem)")
    patch_size: int | None = _f(None, "encoder patch size (PLUTO-4S: 8, 16 or 32; default: the model's)")
    num_classes: int | None = _f(None, "classes incl. background 0 (default: max mask value + 1)")
    runs: int = _f(1, "independent runs")
    seed: int = _f(0, "base seed; run i uses seed + i")
    lr: float = _f(2e-3, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(64, "training batch size")
    max_steps: int = _f(2_000, "optimiser steps")
    val_every: int = _f(0, "validate every N steps (0: once per pass over the training set)")
    image_size: int | None = _f(
        None, "resize images/masks to this square size (default: keep; must divide by patch)"
    )
    batch_size_embed: int = _f(16, "images per encoder forward pass")
    device: str = _f("cpu", "torch device")
    compile: bool = _f(False, "torch.compile the encoder's blocks (GPU speed-up after a warm-up)")
    out: str = _f("results/segmentation.json", "results JSON")
    task: str | None = _f(None, "task name for the table (default: data folder name)")

    def validate(self) -> None:
        _positive(
            self, "runs", "lr", "batch_size", "max_steps", "image_size", "num_classes", "batch_size_embed"
        )


@dataclass
class RegressionConfig:
    """HEST-1k: log1p targets, StandardScaler + PCA(256) on the train fold, Ridge, Pearson r."""

    features: str | None = _f(None, "FILE.h5 with `features` [N,D] and `ids` (or `paths`) naming each row")
    targets: str | None = _f(None, "CSV: id column, fold column, one column per target (e.g. gene counts)")
    id_column: str = _f("id", "CSV column matching the h5 `ids`/`paths` (absent: rows match in order)")
    fold_column: str = _f("fold", "CSV column giving each row's fold; each fold is the test set once")
    target_columns: tuple[str, ...] = _f((), "target columns (default: every column but id and fold)")
    n_components: int = _f(256, "PCA components (capped by training rows and feature dims)")
    alpha_numerator: float = _f(100.0, "Ridge alpha = alpha_numerator / (n_components x n_targets)")
    log1p: bool = _f(True, "apply log1p to the targets")
    seed: int = _f(0, "random_state of PCA and Ridge")
    out: str = _f("results/regression.json", "results JSON")
    task: str | None = _f(None, "task name for the table (default: targets file name)")

    def validate(self) -> None:
        _positive(self, "n_components", "alpha_numerator")

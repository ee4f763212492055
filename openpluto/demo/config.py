"""Settings of ``openpluto demo`` (each field is a ``--flag``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from openpluto.errors import ConfigError

PRESET = "cpu-tiny"
DEFAULT_STEPS = 1000  # about 5 minutes for the whole demo on 2 quiet CPU cores (9 CPU-minutes)


@dataclass
class DemoConfig:
    """``openpluto demo``: synthetic slides -> tiles -> pretraining -> embeddings -> evaluation -> report."""

    out: str = field(default="openpluto-demo", metadata={"help": "output folder"})
    steps: int = field(default=DEFAULT_STEPS, metadata={
        "help": f"pretraining steps of {PRESET}; the result depends on this, not on the machine's speed"})
    minutes: float | None = field(default=None, metadata={
        "help": "optional cap on the pretraining time, minutes; a run cut short learns less (the summary "
                "says so)"})
    slides: str | None = field(
        default=None, metadata={"help": "folder of your own slides (default: generate synthetic ones)"})
    n_slides: int = field(default=4, metadata={"help": "synthetic slides to generate"})
    slide_size: int = field(default=3072, metadata={"help": "synthetic slide side, px at 0.5 µm/px"})
    mpp: tuple[float, ...] = field(default=(0.5, 1.0), metadata={"help": "tile resolutions, µm/px"})
    tile_size: int = field(default=128, metadata={"help": "tile side in px"})
    patches_per_class: int = field(
        default=300, metadata={"help": "held-out labelled tiles per tissue class for evaluation"})
    eval_size: int = field(
        default=64, metadata={"help": "evaluation input size, px (cpu-tiny trains at 64)"})
    eval_runs: int = field(default=3, metadata={"help": "linear-probe runs (mean ± std)"})
    eval_steps: int = field(default=600, metadata={"help": "linear-probe steps per run"})
    workers: int = field(default=2, metadata={"help": "worker processes for tiling/embedding"})
    seed: int = field(default=0, metadata={"help": "seed of slides, tiles and training"})
    fresh: bool = field(
        default=False, metadata={"help": "delete --out first instead of reusing finished steps"})

    def validate(self) -> None:
        for name in ("steps", "n_slides", "patches_per_class", "eval_runs", "eval_steps", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"--minutes must be > 0, got {self.minutes:g}")
        if self.slide_size < 512:
            raise ConfigError(f"--slide-size must be >= 512 px, got {self.slide_size}")
        if not self.mpp or min(self.mpp) <= 0:
            raise ConfigError("--mpp needs one or more resolutions > 0 µm/px")
        if self.patches_per_class < 5:
            raise ConfigError(f"--patches-per-class must be >= 5 (train/val/test each need tiles of every "
                              f"class), got {self.patches_per_class}")

    def argv(self) -> list[str]:
        """``openpluto demo`` flags giving this config: ``--out``, then every field not at its default."""
        out: list[str] = ["--out", self.out]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "out" or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, (tuple, list)):
                out += [flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
            else:
                out += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return out

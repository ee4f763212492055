"""Run logs written by rank 0: ``metrics.csv``, TensorBoard events (``tb/``) and ``loss_curve.png``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from openpluto.io import atomic_path

LOSS_KEYS = ("total", "dino_local", "dino_global", "ibot", "koleo")
MONITOR_KEYS = ("teacher_entropy", "student_feat_std")


def collapse_warning(values: dict[str, float], n_prototypes: int, step: int) -> str | None:
    """A one-line warning when the collapse monitors of a logged step look wrong, else None.

    - ``teacher_entropy`` above 97% of ``ln(n_prototypes)``: the teacher targets are almost uniform,
      so the student is only taught to output uniform scores (the run learns nothing);
    - ``student_feat_std`` below 1e-3: every image gets the same (L2-normalised) CLS token.
    """
    entropy, std = values.get("teacher_entropy"), values.get("student_feat_std")
    uniform = math.log(max(int(n_prototypes), 2))
    if entropy is not None and math.isfinite(entropy) and entropy > 0.97 * uniform:
        return (
            f"warning: step {step}: teacher targets are near uniform (entropy {entropy:.2f} of "
            f"ln {n_prototypes} = {uniform:.2f}); lower schedule.teacher_temp(_start) or raise "
            "optim.base_lr, or this run will not learn"
        )
    if std is not None and math.isfinite(std) and std < 1e-3:
        return (
            f"warning: step {step}: student features have collapsed (std {std:.2g} over the batch); "
            "lower optim.base_lr or raise ssl.loss.koleo_weight, then --resume from an earlier run"
        )
    return None


class MetricsLog:
    """Append one row of scalars per logged step to CSV (+ TensorBoard).

    Row ``step`` describes the ``step``-th optimizer step. On resume from a checkpoint taken after
    ``start_step`` steps, the rows after it (logged after the checkpoint by the killed run) are
    dropped and TensorBoard purges its later events, so curves never hold duplicates.
    """

    def __init__(self, run_dir: Path, start_step: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] | None = None
        if self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or []) or None
                rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= start_step]
            if self.columns:
                with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.columns)
                    w.writeheader()
                    w.writerows(rows)
            else:
                self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(
                    str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None
                )
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        if self.columns is None:
            self.columns = list(row)
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    group = "loss" if k in LOSS_KEYS else ("monitor" if k in MONITOR_KEYS else "train")
                    self.tb.add_scalar(f"{group}/{k}", v, step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` as floats (empty cells dropped)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return out


def plot_loss_curve(run_dir: str | Path) -> Path | None:
    """``RUN/loss_curve.png``: loss terms (left) and collapse monitors (right) against the step."""
    run_dir = Path(run_dir)
    csv_path = run_dir / "metrics.csv"
    if not csv_path.is_file():
        return None
    rows = read_metrics(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, title in ((axes[0], LOSS_KEYS, "losses"), (axes[1], MONITOR_KEYS, "collapse monitors")):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
            if pts:
                ax.plot(*zip(*pts), label=k, lw=1.2)
        ax.set_xlabel("step", fontsize=12)
        ax.set_title(title, fontsize=13)
        ax.tick_params(labelsize=11)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=11)  # readable when the figure is shown at page width
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out

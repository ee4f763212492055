"""``RUN/checkpoint.pt`` (or a kept ``RUN/checkpoints/step_N.pt``) -> the EMA teacher's backbone as an
openpluto model dir (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

from openpluto.config import from_dict
from openpluto.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    kept_checkpoint_path,
    kept_steps,
    load_checkpoint,
)
from openpluto.train.config import TrainConfig

TEACHER_PREFIX = "teacher.backbone."


def export_teacher(run_dir: str | Path, out_dir: str | Path, which: str = "teacher", step: int | None = None
                   ) -> Path:
    """Write ``which`` (``teacher`` or ``student``) backbone of a run to ``out_dir``; return ``out_dir``.

    ``step``: export the checkpoint kept at that step (``log.keep_every``) instead of the latest.

    The result has ``config.json`` + ``model.safetensors`` and loads with ``load_pretrained`` /
    ``load_encoder`` (heads are dropped: they are only needed for pretraining).
    """
    from openpluto.model import build_model, save_pretrained

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    path = run_dir / CHECKPOINT_NAME if step is None else _kept(run_dir, step)
    ckpt = load_checkpoint(path)
    cfg = from_dict(TrainConfig, ckpt["config"])
    prefix = f"{which}.backbone."
    sd = {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(
            f"{path} holds no '{prefix}*' weights; is it a pretrain run?"
        )
    backbone = build_model(cfg.model, **cfg.model_overrides)
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match model '{cfg.model}' "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    save_pretrained(backbone, out_dir)
    return out_dir


def _kept(run_dir: Path, step: int) -> Path:
    """The kept checkpoint of ``step``; a one-line error naming the steps that are kept when it is not."""
    path = kept_checkpoint_path(run_dir, step)
    if not path.is_file():
        steps = kept_steps(run_dir)
        have = f"kept steps: {', '.join(map(str, steps))}" if steps else (
            "it keeps none; pretrain with log.keep_every=N to keep every N-th step")
        raise CheckpointError(f"{run_dir} has no checkpoint kept at step {step} ({have})")
    return path

"""``RUN/checkpoint.pt`` -> the EMA teacher's backbone as an openpluto model dir (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

from openpluto.config import from_dict
from openpluto.train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from openpluto.train.config import TrainConfig

TEACHER_PREFIX = "teacher.backbone."


def export_teacher(run_dir: str | Path, out_dir: str | Path, which: str = "teacher") -> Path:
    """Write ``which`` (``teacher`` or ``student``) backbone of a run to ``out_dir``; return ``out_dir``.

    The result has ``config.json`` + ``model.safetensors`` and loads with ``load_pretrained`` /
    ``load_encoder`` (heads are dropped: they are only needed for pretraining).
    """
    from openpluto.model import build_model, save_pretrained

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME)
    cfg = from_dict(TrainConfig, ckpt["config"])
    prefix = f"{which}.backbone."
    sd = {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(
            f"{run_dir / CHECKPOINT_NAME} holds no '{prefix}*' weights; is it a pretrain run?"
        )
    backbone = build_model(cfg.model, **cfg.model_overrides)
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{run_dir / CHECKPOINT_NAME} does not match model '{cfg.model}' "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    save_pretrained(backbone, out_dir)
    return out_dir

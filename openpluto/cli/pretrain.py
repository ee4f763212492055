"""``openpluto pretrain`` (DINOv2-style SSL, one process or torchrun) and ``openpluto export``."""

from __future__ import annotations

import argparse
from pathlib import Path

PRETRAIN_EPILOG = """examples:
  openpluto pretrain --config cpu-tiny --data tiles/ --out runs/tiny --max-steps 300
  openpluto pretrain --out runs/tiny --resume                      # continue after a kill / SIGTERM
  openpluto pretrain --config cpu-tiny --data tiles/ --out runs/t --max-minutes 10   # a time cap
  torchrun --nproc-per-node 8 -m openpluto.cli.main pretrain --config pluto4s --data tiles/ --out runs/4s
  openpluto pretrain --config pluto4g --data tiles/ --out runs/4g dist.strategy=fsdp optim.base_lr=2e-4
presets: cpu-tiny, pluto4s, pluto4g (openpluto/train/presets/*.yaml) or your own YAML file;
key=value overrides address any config field (e.g. data.batch_size=64 ssl.crops.n_local=8).
exit status: 0 done (max_steps or --max-minutes reached), 2 bad input, 143/130 stopped by SIGTERM/SIGINT
(a checkpoint is written first; --resume continues)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` and ``export``."""
    p = subparsers.add_parser(
        "pretrain",
        help="self-supervised pretraining (DINOv2-style) on tile shards or an image folder",
        description="DINOv2-style pretraining with per-step FlexiViT patch sizes; resumable; torchrun-ready.",
        epilog=PRETRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="preset name (cpu-tiny, pluto4s, pluto4g) or a YAML file "
        "(default with --resume: RUN/config.yaml)",
    )
    p.add_argument("--data", help="folder with WebDataset *.tar shards (searched recursively) or images")
    p.add_argument(
        "--out", required=True, help="run directory (checkpoint.pt, metrics.csv, tb/, loss_curve.png)"
    )
    p.add_argument("--max-steps", type=int, help="length of the run in optimizer steps (sets max_steps)")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="stop cleanly (with a checkpoint) at the first step after this many minutes; the schedules "
        "still follow max_steps, so --resume continues the same run (sets max_minutes)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from RUN/checkpoint.pt (fresh start if none)"
    )
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone blocks (sets compile=true; a few minutes of warm-up)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.base_lr=1e-3"
    )
    p.set_defaults(func=run_pretrain)

    e = subparsers.add_parser(
        "export",
        help="write a run's EMA teacher backbone as a model dir",
        description="RUN/checkpoint.pt -> MODEL_DIR/{config.json, model.safetensors}",
    )
    e.add_argument("run", help="pretraining run directory")
    e.add_argument(
        "--out", required=True, help="model directory to write (load with load_pretrained/--model)"
    )
    e.add_argument(
        "--student", action="store_true", help="export the student backbone instead of the teacher"
    )
    e.add_argument("--step", type=int, help="export the checkpoint kept at this step "
                   "(RUN/checkpoints/step_N.pt, written with log.keep_every=N) instead of the latest")
    e.set_defaults(func=run_export)


def run_pretrain(args: argparse.Namespace) -> int:
    from openpluto.config import load_yaml, merge_dicts, parse_overrides
    from openpluto.errors import ConfigError
    from openpluto.train.config import load_train_config
    from openpluto.train.trainer import pretrain

    out = Path(args.out)
    extra = parse_overrides(args.overrides)
    if args.data:
        extra = merge_dicts(extra, {"data": {"path": args.data}})
    if args.max_steps is not None:
        extra["max_steps"] = args.max_steps
    if args.max_minutes is not None:
        extra["max_minutes"] = args.max_minutes
    if args.compile:
        extra["compile"] = True
    if args.config:
        cfg = load_train_config(args.config, extra)
    elif args.resume and (out / "config.yaml").is_file():
        from openpluto.config import from_dict
        from openpluto.train.config import TrainConfig

        cfg = from_dict(TrainConfig, merge_dicts(load_yaml(out / "config.yaml"), extra))
    else:
        raise ConfigError("pass --config NAME|FILE.yaml (presets: cpu-tiny, pluto4s, pluto4g)")
    summary = pretrain(cfg, out, resume=args.resume)
    return pretrain_exit_code(summary)


def pretrain_exit_code(summary: dict) -> int:
    """0 when the run reached max_steps or its time limit; 128 + the signal number (143 for SIGTERM,
    130 for SIGINT) when a signal stopped it, so ``pretrain && export`` never exports a cut-short run."""
    if summary["stopped_by"] == "signal":
        return 128 + int(summary["signal"] or 15)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from openpluto.train.export import export_teacher

    out = export_teacher(args.run, args.out, which="student" if args.student else "teacher", step=args.step)
    src = args.run if args.step is None else f"{args.run} at step {args.step}"
    print(f"export: {'student' if args.student else 'teacher'} backbone of {src} -> {out}")
    return 0

"""``openpluto demo``: the whole loop on built-in synthetic slides, with an HTML report.

slides -> tissue masks + QC -> tiles (WebDataset) -> ``cpu-tiny`` pretraining for ``--minutes`` ->
export -> whole-slide embeddings -> kNN + linear probe (pretrained vs the same architecture at random
init) on held-out synthetic tissue tiles -> ``DIR/report.html``.

Every step runs the same ``openpluto`` sub-command a user would type (printed as it runs), so the demo
doubles as a smoke test of the CLI. The pretraining length is set from a short timed calibration run
so the schedules (warm-up, cosine, teacher temperature) see the whole run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from openpluto.config import add_config_args, config_from_args, save_yaml
from openpluto.errors import OpenPlutoError


@dataclass
class DemoConfig:
    """Settings of ``openpluto demo`` (each a ``--flag``)."""

    out: str = field(default="openpluto-demo", metadata={"help": "output folder"})
    minutes: float = field(default=8.0, metadata={"help": "wall-clock minutes of pretraining"})
    slides: str | None = field(
        default=None, metadata={"help": "folder of your own slides (default: generate synthetic ones)"})
    n_slides: int = field(default=4, metadata={"help": "synthetic slides to generate"})
    slide_size: int = field(default=3072, metadata={"help": "synthetic slide side, px at 0.25 µm/px"})
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


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole loop on synthetic slides and write DIR/report.html",
        description=__doc__.split("\n\n")[1],
    )
    add_config_args(p, DemoConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openpluto.cli.demo_steps import run_demo

    cfg = config_from_args(DemoConfig, args)
    out = Path(cfg.out)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "demo.yaml")
    t0 = time.time()
    summary = run_demo(cfg)
    summary["minutes_total"] = round((time.time() - t0) / 60, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    line = "=" * 72
    print(f"\n{line}\nopenpluto demo finished in {summary['minutes_total']:.1f} min")
    print(f"  slides: {summary['n_slides']}  tiles: {summary['n_tiles']}  "
          f"pretraining steps: {summary['steps']}  embedded tiles: {summary['n_embedded']}")
    for row in summary["results"]:
        print(f"  {row['task']:<28} pretrained {row['pretrained']:<16} random init {row['random']}")
    verdict = "beats" if summary["pretrained_wins"] else "does NOT beat"
    print(f"  the pretrained encoder {verdict} random init on kNN")
    print(f"  report: {(out / 'report.html').resolve()}\n{line}")


def cli(argv: list[str], log: Path | None = None) -> None:
    """Run ``openpluto ARGV`` in this process; print it first; raise if it fails."""
    from openpluto.cli.main import main

    text = "openpluto " + " ".join(shlex.quote(a) for a in argv)
    print(f"\n$ {text}", flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(text + "\n")
    rc = main(argv)
    if rc:
        raise OpenPlutoError(f"demo step failed (exit {rc}): {text}")

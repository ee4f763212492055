"""``openpluto demo``: the whole loop on built-in synthetic slides, with an HTML report.

slides -> tissue masks + QC -> tiles (WebDataset) -> ``cpu-tiny`` pretraining for ``--steps`` ->
export -> whole-slide embeddings -> feature maps against the ground truth -> kNN + linear probe
(pretrained vs the same architecture at random init) on held-out synthetic tissue tiles ->
``DIR/report.html``.

Every step runs the same ``openpluto`` sub-command a user would type (printed as it runs, kept in
``DIR/commands.txt``), so the demo doubles as a smoke test of the CLI. The steps live in
``openpluto.demo``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from openpluto.config import add_config_args
    from openpluto.demo.config import DemoConfig

    p = subparsers.add_parser(
        "demo",
        help="run the whole loop on synthetic slides and write DIR/report.html",
        description=__doc__.split("\n\n")[1].replace("``", ""),
    )
    add_config_args(p, DemoConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from openpluto.config import config_from_args, save_yaml
    from openpluto.demo.commands import CommandLog
    from openpluto.demo.config import DemoConfig
    from openpluto.demo.inputs import user_slides
    from openpluto.demo.page import write_demo_report
    from openpluto.demo.run import run_demo
    from openpluto.io import write_json_atomic

    cfg = config_from_args(DemoConfig, args)
    if cfg.slides:
        user_slides(cfg.slides)  # before anything is written
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        from openpluto.errors import OpenPlutoError

        raise OpenPlutoError(f"--out {out} is a file; give a folder")
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "demo.yaml")
    log = CommandLog(out / "commands.txt")
    log.begin(cfg.argv())
    summary = run_demo(cfg, out, log)
    write_json_atomic(out / "summary.json", summary.to_dict())
    report = write_demo_report(cfg, out, summary, log.history())
    line = "=" * 72
    print(f"\n{line}\n" + "\n".join(summary.lines()) + f"\n  report: {report.resolve()}\n{line}")
    return 0

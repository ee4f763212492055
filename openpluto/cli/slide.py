"""``openpluto tissue`` and ``openpluto tiles``: slides -> tissue masks / multi-resolution tile shards."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tissue`` and ``tiles`` sub-commands."""
    from openpluto.config import add_config_args
    from openpluto.slide.config import TilesConfig, TissueConfig

    p = subparsers.add_parser(
        "tissue",
        help="tissue + artifact masks, GeoJSON and QC overlays of slides",
        description="Write <id>_mask.png, <id>_overlay.png, <id>.geojson (QuPath) and <id>.json per slide "
        "into --out; failures go to errors.csv. Exit codes: 0 all done, 3 some slides failed, 1 none done or "
        "bad usage, 130 interrupted, 143 terminated.",
    )
    p.add_argument("slides", nargs="+", help="slide files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--mpp-override", default=None, help="µm/px for slides without it: number or CSV slide,mpp"
    )
    p.add_argument("--workers", type=int, default=1, help="slides in parallel (processes)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per slide before it is abandoned")
    p.add_argument(
        "--shard", default=None, help="I/N: only shard I of N of the slides (default: Slurm array / torchrun)"
    )
    p.add_argument("--overwrite", action="store_true", help="redo slides already done (also other settings)")
    add_config_args(p, TissueConfig)
    p.set_defaults(func=run_tissue_cmd)

    p = subparsers.add_parser(
        "tiles",
        help="cut multi-resolution tiles of usable tissue into WebDataset shards",
        description="Tiles at each --mpp x --tile-size over usable tissue -> OUT/shards/*.tar (jpg + json), "
        "OUT/manifest.csv, OUT/errors.csv, OUT/summary.json, OUT/qc/. Reruns skip finished slides. "
        "Exit codes: 0 all done, 3 some slides failed, 1 none done or bad usage, 130 interrupted, "
        "143 terminated.",
    )
    p.add_argument("slides", nargs="+", help="slide files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    add_config_args(p, TilesConfig)
    add_config_args(p, TissueConfig)
    p.set_defaults(func=run_tiles_cmd)


def run_tissue_cmd(args: argparse.Namespace) -> int:
    from openpluto.jobs.exitcodes import run_stage

    return run_stage(lambda: _tissue(args), debug=getattr(args, "debug", False))


def _tissue(args: argparse.Namespace) -> int:
    from openpluto.config import config_from_args
    from openpluto.jobs.exitcodes import batch_exit_code
    from openpluto.jobs.outputs import shard_part
    from openpluto.slide.config import TissueConfig
    from openpluto.slide.tissue_batch import run_tissue

    cfg = config_from_args(TissueConfig, args)
    summary = run_tissue(
        args.slides,
        args.out,
        cfg,
        mpp_override=args.mpp_override,
        workers=args.workers,
        timeout=args.timeout,
        shard=args.shard,
        overwrite=args.overwrite,
    )
    for i in summary["infos"]:
        area = (
            f"{i['tissue_mm2']:.2f} mm² tissue"
            if i["tissue_mm2"] is not None
            else f"{100 * i['tissue_fraction']:.1f}% tissue"
        )
        arts = (
            ", ".join(f"{k} {100 * v:.1f}%" for k, v in i["artifact_fraction"].items() if v > 0)
            or "no artifacts"
        )
        print(f"{i['slide']}: {area}, usable {100 * i['usable_fraction']:.1f}% of the slide; {arts}")
    already = f" ({summary['already']} already done before)" if summary["already"] else ""
    errors_file = shard_part("errors.csv", summary["shard"])
    failed = f", {summary['failed']} failed (see {args.out}/{errors_file})" if summary["failed"] else ""
    print(f"{summary['done']} slides done{already}{failed} -> {args.out}")
    return batch_exit_code(summary["done"], summary["failed"])


def run_tiles_cmd(args: argparse.Namespace) -> int:
    from openpluto.jobs.exitcodes import run_stage

    return run_stage(lambda: _tiles(args), debug=getattr(args, "debug", False))


def _tiles(args: argparse.Namespace) -> int:
    from openpluto.config import config_from_args
    from openpluto.jobs.exitcodes import batch_exit_code
    from openpluto.jobs.outputs import shard_part
    from openpluto.slide.config import TilesConfig, TissueConfig
    from openpluto.slide.tiles import format_summary, run_tiles

    cfg = config_from_args(TilesConfig, args)
    tcfg = config_from_args(TissueConfig, args)
    summary = run_tiles(args.slides, args.out, cfg, tcfg)
    print(format_summary(summary))
    names = ", ".join(shard_part(n, summary["shard"]) for n in ("manifest.csv", "errors.csv", "summary.json"))
    print(f"-> {args.out}/shards, {names}, qc/")
    done = summary["slides_ok"]
    return batch_exit_code(done, summary["slides_failed"])

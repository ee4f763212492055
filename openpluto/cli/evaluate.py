"""``openpluto eval linear|knn|abmil|segmentation|regression|table``: benchmark frozen encoders."""

from __future__ import annotations

import argparse

from openpluto.config import add_config_args, config_from_args

_HELP = {
    "linear": "eva linear probe (balanced accuracy, mean ± std over runs)",
    "knn": "DINO weighted kNN (cosine, k=20, T=0.07) on frozen embeddings",
    "abmil": "gated-attention ABMIL on slide feature bags (balanced accuracy, macro-F1)",
    "segmentation": "ConvDecoderWithImage on frozen patch tokens (mean Dice, no background)",
    "regression": "HEST-1k ridge on PCA(256) features (Pearson r, mean ± std over folds)",
}


def _config_class(protocol: str):
    from openpluto.eval import config

    return {
        "linear": config.LinearConfig,
        "knn": config.KnnConfig,
        "abmil": config.AbmilConfig,
        "segmentation": config.SegmentationConfig,
        "regression": config.RegressionConfig,
    }[protocol]


def _run_protocol(args: argparse.Namespace) -> int:
    import logging

    from openpluto.eval import runners
    from openpluto.eval.results import format_summary
    from openpluto.io import write_json_atomic

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(_config_class(args.protocol), args)
    res = getattr(runners, f"run_{args.protocol}")(cfg)
    write_json_atomic(cfg.out, res)
    print(format_summary(res))
    print(f"wrote {cfg.out} ({res['seconds']:.1f} s); rerun: {res['rerun']}")
    return 0


def _run_table(args: argparse.Namespace) -> int:
    from openpluto.eval.results import load_results
    from openpluto.eval.table import results_table
    from openpluto.io import write_text_atomic

    table = results_table([load_results(p) for p in args.results], digits=args.digits)
    print(table, end="")
    if args.out:
        write_text_atomic(args.out, table)
        print(f"wrote {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``openpluto eval`` and its protocol sub-commands."""
    from openpluto.eval.config import (
        AbmilConfig,
        KnnConfig,
        LinearConfig,
        RegressionConfig,
        SegmentationConfig,
    )

    parser = subparsers.add_parser(
        "eval",
        help="benchmark frozen encoders (linear, knn, abmil, segmentation, regression) and tabulate results",
    )
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    classes = {
        "linear": LinearConfig,
        "knn": KnnConfig,
        "abmil": AbmilConfig,
        "segmentation": SegmentationConfig,
        "regression": RegressionConfig,
    }
    for name, cls in classes.items():
        p = sub.add_parser(
            name,
            help=_HELP[name],
            description=_HELP[name] + ". Every flag is written to the "
            "results JSON together with the command that reruns it.",
        )
        add_config_args(p, cls)
        p.set_defaults(func=_run_protocol)
    t = sub.add_parser("table", help="Markdown table of results JSONs (encoders x tasks, best in bold)")
    t.add_argument("results", nargs="+", help="results JSON files from `openpluto eval ...`")
    t.add_argument("--out", help="also write the table to this .md file")
    t.add_argument("--digits", type=int, default=3, help="decimals shown (default: 3)")
    t.set_defaults(func=_run_table)

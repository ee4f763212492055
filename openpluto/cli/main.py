"""Entry point of the ``openpluto`` command.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)``, adding its sub-command(s) with
``parser.set_defaults(func=...)``. Heavy imports happen inside the command functions, so
``openpluto --help`` stays fast. User errors (``OpenPlutoError``) print one line and exit 2;
``--debug`` (or ``OPENPLUTO_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from openpluto import __version__
from openpluto.errors import OpenPlutoError

COMMAND_MODULES = [
    "openpluto.cli.slide",  # tissue, tiles
    "openpluto.cli.model",  # export-timm
    "openpluto.cli.pretrain",  # pretrain, export
    "openpluto.cli.embed",  # embed
    "openpluto.cli.embed_images",  # embed-images
    "openpluto.cli.evaluate",  # eval linear|knn|abmil|segmentation|regression|table
    "openpluto.cli.demo",  # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openpluto",
        description="Whole-slide images -> tiles -> self-supervised pretraining -> embeddings -> benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"openpluto {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("OPENPLUTO_DEBUG") == "1"
    try:
        rc = args.func(args)
        return int(rc or 0)
    except OpenPlutoError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

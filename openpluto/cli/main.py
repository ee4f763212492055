"""Entry point of the ``openpluto`` command.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)``, adding its sub-command(s) with
``parser.set_defaults(func=...)``. Heavy imports happen inside the command functions, so
``openpluto --help`` stays fast. User errors (``OpenPlutoError``) print one line and exit 2;
``--debug`` (or ``OPENPLUTO_DEBUG=1``) shows the traceback instead. A command-line mistake (a
missing or unknown argument) is one line too, ``error: ... (see openpluto CMD --help)``, exit 2;
bare ``openpluto`` lists the commands and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from openpluto import __version__
from openpluto.errors import OpenPlutoError

USAGE_ERROR = 2  # exit status of a command-line mistake, as argparse uses

COMMAND_MODULES = [
    "openpluto.cli.slide",  # tissue, tiles
    "openpluto.cli.model",  # export-timm
    "openpluto.cli.pretrain",  # pretrain, export
    "openpluto.cli.embed",  # embed
    "openpluto.cli.embed_images",  # embed-images
    "openpluto.cli.evaluate",  # eval linear|knn|abmil|segmentation|regression|table
    "openpluto.cli.demo",  # demo
]


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming the ``--help`` to read.

    Sub-command parsers are made with the same class (argparse uses the parent's class).
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # name the sub-command whose --help lists the arguments it does know
            prog = " ".join(["openpluto", *(getattr(args, k, None) or "" for k in ("command", "protocol"))])
            parser.prog = prog.strip()
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else USAGE_ERROR
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE_ERROR
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

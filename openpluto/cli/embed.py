"""``openpluto embed`` (tile embeddings of whole slides -> ``<slide>.h5``) and ``openpluto embed-pca``."""

from __future__ import annotations

import argparse

EMBED_EPILOG = """\
examples:
  openpluto embed slides/ --model runs/exp1/export --out feats/ --mpp 0.5 --pooling cls+mean
  openpluto embed a.svs b.ndpi --model pluto4s --patch-size 8 --out feats/   # random init (baseline)
  torchrun --nproc-per-node 4 -m openpluto.cli.main embed slides/ --model M --out feats/

writes DIR/<id>.h5 (features [N, D] float32, coords [N, 2] int64 level-0 x, y; attrs mpp, tile_size,
tile_size_level0, patch_size, pooling, model, weights_hash, slide_id, settings, ...), DIR/errors.csv,
DIR/summary.json (with --shard I/N: errors.part-I-of-N.csv, ...), DIR/embed_config.json and
DIR/pictures/<id>_pc1.png. Finished slides are skipped on rerun; other settings are refused (--overwrite).

exit codes: 0 all done, 3 some slides failed, 1 none done or bad usage, 130 interrupted, 143 terminated.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed`` and ``embed-pca``."""
    from openpluto.config import add_config_args
    from openpluto.embed.config import EmbedConfig, PcaPictureConfig

    p = subparsers.add_parser(
        "embed", help="embed the tissue tiles of whole slides into <slide>.h5 feature files",
        description="Tissue tiles at a target µm/px -> tile embeddings, one HDF5 file per slide.",
        epilog=EMBED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, EmbedConfig, positional=("inputs",))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)

    q = subparsers.add_parser(
        "embed-pca", help="PNG of a slide region with the PCA of its patch tokens as RGB (DINOv2-style)",
        description="Reads SIZE px at MPP µm/px from the slide and colours each patch by the first three "
                    "principal components of its token.")
    add_config_args(q, PcaPictureConfig, positional=("slide",))
    q.set_defaults(func=run_pca)


def run(args: argparse.Namespace) -> int:
    from openpluto.jobs.exitcodes import run_stage

    return run_stage(lambda: _embed(args), debug=getattr(args, "debug", False))


def _embed(args: argparse.Namespace) -> int:
    from openpluto.config import config_from_args
    from openpluto.embed.config import EmbedConfig
    from openpluto.embed.pipeline import run_embed
    from openpluto.jobs.exitcodes import batch_exit_code

    cfg = config_from_args(EmbedConfig, args)
    summary = run_embed(cfg, progress=not args.no_progress)
    return batch_exit_code(summary.embedded + summary.skipped, summary.failed)


def run_pca(args: argparse.Namespace) -> int:
    """``embed-pca``: exit codes as the other slide commands (0 done, 1 bad slide or usage, 130, 143)."""
    from openpluto.jobs.exitcodes import run_stage

    return run_stage(lambda: _pca(args), debug=getattr(args, "debug", False))


def _pca(args: argparse.Namespace) -> int:
    from openpluto.config import config_from_args
    from openpluto.embed.config import PcaPictureConfig
    from openpluto.embed.pictures import region_pca_picture

    cfg = config_from_args(PcaPictureConfig, args)
    path = region_pca_picture(cfg)
    print(f"wrote {path}")
    return 0

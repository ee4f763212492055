"""``openpluto embed`` (tile embeddings of whole slides -> ``<slide>.h5``) and ``openpluto embed-pca``."""

from __future__ import annotations

import argparse

EMBED_EPILOG = """\
examples:
  openpluto embed slides/ --model runs/exp1/export --out feats/ --mpp 0.5 --pooling cls+mean
  openpluto embed a.svs b.ndpi --model pluto4s --patch-size 8 --out feats/   # random init (baseline)
  torchrun --nproc-per-node 4 -m openpluto.cli.main embed slides/ --model M --out feats/

writes DIR/<slide>.h5 (features [N, D] float32, coords [N, 2] int64 level-0 x, y; attrs mpp, tile_size,
tile_size_level0, patch_size, pooling, model, weights_hash, ...), DIR/errors.csv, DIR/embed_config.json
and DIR/pictures/<slide>_pc1.png. Finished slides are skipped on rerun.
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
    from openpluto.config import config_from_args
    from openpluto.embed.config import EmbedConfig
    from openpluto.embed.pipeline import run_embed

    cfg = config_from_args(EmbedConfig, args)
    summary = run_embed(cfg, progress=not args.no_progress)
    return 1 if summary.failed and not summary.embedded and not summary.skipped else 0


def run_pca(args: argparse.Namespace) -> int:
    from openpluto.config import config_from_args
    from openpluto.embed.config import PcaPictureConfig
    from openpluto.embed.pictures import region_pca_picture

    cfg = config_from_args(PcaPictureConfig, args)
    path = region_pca_picture(cfg)
    print(f"wrote {path}")
    return 0

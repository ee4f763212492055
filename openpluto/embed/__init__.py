"""openpluto.embed: whole-slide tile embeddings (HDF5 like CLAM/TRIDENT) and pictures of the features.

``run_embed(EmbedConfig(...))`` is ``openpluto embed``; ``read_slide_h5`` loads a result. The
image-folder counterpart (``embed_images``) lives in ``openpluto.embed.images``.
"""

from openpluto.embed.config import EmbedConfig, PcaPictureConfig
from openpluto.embed.dataset import SlideTileDataset, tile_loader
from openpluto.embed.distributed import DistInfo, init_distributed, shard
from openpluto.embed.pipeline import (
    EmbedSummary,
    SlidePlan,
    TileEmbedder,
    embed_slide,
    find_slides,
    plan_slide,
    run_embed,
)
from openpluto.embed.writer import is_complete, open_slide_h5, read_slide_h5

__all__ = [
    "DistInfo",
    "EmbedConfig",
    "EmbedSummary",
    "PcaPictureConfig",
    "SlidePlan",
    "SlideTileDataset",
    "TileEmbedder",
    "embed_slide",
    "find_slides",
    "init_distributed",
    "is_complete",
    "open_slide_h5",
    "plan_slide",
    "read_slide_h5",
    "run_embed",
    "shard",
    "tile_loader",
]

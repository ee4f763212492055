"""openpluto.embed: whole-slide tile embeddings (HDF5 like CLAM/TRIDENT) and pictures of the features.

``run_embed(EmbedConfig(...))`` is ``openpluto embed``; ``read_slide_h5`` loads a result. The
image-folder counterpart (``embed_images``) lives in ``openpluto.embed.images``.
"""

import importlib
from typing import Any

# Public names -> defining module. Imported lazily (PEP 562) so that `openpluto --help`, which reads
# EmbedConfig, does not pay for importing torch.
_EXPORTS = {
    "EmbedConfig": "config", "PcaPictureConfig": "config",
    "SlideTileDataset": "dataset", "tile_loader": "dataset",
    "EmbedSummary": "cohort", "run_embed": "pipeline",
    "SlidePlan": "slides", "TileEmbedder": "embedder", "embed_slides": "slides", "plan_slide": "slides",
    "is_complete": "writer", "open_slide_h5": "writer", "read_slide_h5": "writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'openpluto.embed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"openpluto.embed.{_EXPORTS[name]}"), name)

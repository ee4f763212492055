"""Building blocks of PlutoViT that timm does not provide as-is."""

from openpluto.model.layers.block import PlutoBlock, apply_rope, rope_tables
from openpluto.model.layers.patch_embed import FlexiPatchEmbed

__all__ = ["FlexiPatchEmbed", "PlutoBlock", "apply_rope", "rope_tables"]

"""Building blocks of PlutoViT that timm does not provide as-is."""

from openpluto.model.layers.block import PlutoBlock, sdpa_priority
from openpluto.model.layers.patch_embed import FlexiPatchEmbed
from openpluto.model.layers.rope import apply_rope, rope_qk, rope_qk_math, rope_tables

__all__ = ["FlexiPatchEmbed", "PlutoBlock", "apply_rope", "rope_qk", "rope_qk_math", "rope_tables",
           "sdpa_priority"]

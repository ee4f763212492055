"""openpluto.slide: read slides at a target µm/px, tissue and artifact masks, tiles, synthetic slides."""

from openpluto.slide.config import TilesConfig, TissueConfig
from openpluto.slide.mpp import MppOverrides, resolve_mpp
from openpluto.slide.reader import Slide, SlideError, open_slide
from openpluto.slide.tissue import TissueResult, detect_tissue, grid_tiles

__all__ = [
    "MppOverrides",
    "Slide",
    "SlideError",
    "TilesConfig",
    "TissueConfig",
    "TissueResult",
    "detect_tissue",
    "grid_tiles",
    "open_slide",
    "resolve_mpp",
]

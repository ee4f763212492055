"""openpluto.slide: read slides at a target µm/px, tissue and artifact masks, tiles."""

import importlib
from typing import Any

# Public names -> defining module, imported lazily (PEP 562) to keep `openpluto --help` fast.
_EXPORTS = {
    "TilesConfig": "config", "TissueConfig": "config",
    "MppOverrides": "mpp", "resolve_mpp": "mpp",
    "Slide": "reader", "SlideError": "reader", "open_slide": "reader",
    "TissueResult": "tissue", "detect_tissue": "tissue", "grid_tiles": "tissue",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'openpluto.slide' has no attribute {name!r}")
    return getattr(importlib.import_module(f"openpluto.slide.{_EXPORTS[name]}"), name)

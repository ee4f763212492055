"""Masks -> GeoJSON FeatureCollection of polygons in level-0 pixels (QuPath: File > Import objects)."""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import approximate_polygon, find_contours

from openpluto.io import write_text_atomic

# QuPath classification colours (RGB) per mask name.
COLORS = {
    "tissue": (0, 160, 0),
    "pen": (0, 60, 255),
    "blur": (230, 200, 0),
    "fold": (220, 0, 0),
    "usable": (0, 200, 120),
}


def _rings(mask: np.ndarray, downsample: float, tolerance: float) -> list[list[list[float]]]:
    """Closed rings (level-0 x, y) of the boundaries of a filled bool mask."""
    padded = np.pad(mask.astype(np.float32), 1)
    rings = []
    for c in find_contours(padded, 0.5):
        c = approximate_polygon(c, tolerance) if len(c) > 8 else c
        if len(c) < 4:
            continue
        pts = [
            [round(float((x - 1 + 0.5) * downsample), 1), round(float((y - 1 + 0.5) * downsample), 1)]
            for y, x in c
        ]
        if pts[0] != pts[-1]:
            pts.append(pts[0])
        rings.append(pts)
    return rings


def mask_to_polygons(
    mask: np.ndarray, downsample: float, min_px: int = 4, tolerance: float = 1.0
) -> list[dict]:
    """GeoJSON Polygon geometries (exterior + holes) of each connected piece of ``mask``."""
    lab, n = ndi.label(mask)
    out = []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab[sl] == i
        if comp.sum() < min_px:
            continue
        filled = ndi.binary_fill_holes(comp)
        outer = _rings(filled, downsample, tolerance)
        if not outer:
            continue
        dx, dy = sl[1].start * downsample, sl[0].start * downsample

        def shift(ring: list, dx: float = dx, dy: float = dy) -> list:
            return [[round(p[0] + dx, 1), round(p[1] + dy, 1)] for p in ring]

        ring0 = max(outer, key=len)
        holes = []
        hole_mask = filled & ~comp
        if hole_mask.any():
            hl, hn = ndi.label(hole_mask)
            for j, hs in enumerate(ndi.find_objects(hl), start=1):
                if hs is None:
                    continue
                h = hl == j
                if h.sum() >= min_px:
                    holes.extend(_rings(h, downsample, tolerance))
        out.append({"type": "Polygon", "coordinates": [shift(ring0)] + [shift(r) for r in holes]})
    return out


def masks_to_feature_collection(
    masks: dict[str, np.ndarray], downsample: float, slide_name: str = ""
) -> dict:
    """FeatureCollection with one feature per polygon, classified by mask name (Tissue, Pen, Blur, Fold)."""
    feats = []
    for name, mask in masks.items():
        for geom in mask_to_polygons(mask, downsample):
            color = list(COLORS.get(name, (128, 128, 128)))
            feats.append(
                {
                    "type": "Feature",
                    "geometry": geom,
                    "properties": {
                        "objectType": "annotation",
                        "name": name,
                        "classification": {"name": name.capitalize(), "color": color},
                        "slide": slide_name,
                    },
                }
            )
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(
    path: str | os.PathLike, masks: dict[str, np.ndarray], downsample: float, slide_name: str = ""
) -> None:
    write_text_atomic(path, json.dumps(masks_to_feature_collection(masks, downsample, slide_name)))

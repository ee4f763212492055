"""Per-slide HDF5 output, written batch by batch into a temp file and renamed when complete.

Layout of ``<slide>.h5`` (reads as-is in CLAM/TRIDENT-style slide-level code)::

    features        [N, D] float32      tile embeddings (D = 2 * embed_dim for pooling "cls+mean")
    coords          [N, 2] int64        level-0 pixel x, y of each tile's top-left corner
    tissue_fraction [N]    float32      usable-tissue fraction of each tile (from the tissue mask)
    patch_tokens    [N, h*w, D] float16 optional (--save-patch-tokens); attrs grid_h, grid_w, patch_size

File attributes: ``mpp`` (µm/px of the tiles), ``tile_size`` (px at ``mpp``), ``tile_size_level0`` (px at
level 0), ``patch_size``, ``pooling``, ``model``, ``weights_hash``, ``openpluto_version``, ``slide_path``,
``slide_name``, ``slide_mpp`` (level-0 µm/px), ``level`` (pyramid level read), ``level_downsample``,
``embed_dim``, ``num_tiles``, ``min_tissue``, ``dtype``. ``coords`` also carries CLAM's
``patch_size``/``patch_level``/``patch_size_level0`` attributes.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from openpluto.io import atomic_path


class SlideH5Writer:
    """Fixed-size datasets created up front (N is known from the tile grid); batches fill rows in order."""

    def __init__(self, f: h5py.File, coords: np.ndarray, feature_dim: int, attrs: dict[str, Any],
                 tissue_fraction: np.ndarray | None = None, token_shape: tuple[int, int] | None = None,
                 token_grid: tuple[int, int] | None = None, chunk_rows: int = 256):
        n = len(coords)
        self.f = f
        self.n = n
        self.row = 0
        for k, v in attrs.items():
            f.attrs[k] = "" if v is None else v
        c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(n, 2))
        for k in ("tile_size", "tile_size_level0", "level"):
            if k in attrs:
                c.attrs[{"tile_size": "patch_size", "tile_size_level0": "patch_size_level0",
                         "level": "patch_level"}[k]] = attrs[k]
        c.attrs["coords_level"] = 0
        if tissue_fraction is not None:
            f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32))
        chunks = (max(1, min(chunk_rows, n)), feature_dim) if n else None
        self.features = f.create_dataset("features", shape=(n, feature_dim), dtype=np.float32, chunks=chunks)
        self.tokens = None
        if token_shape is not None:
            n_tok, dim = token_shape
            self.tokens = f.create_dataset("patch_tokens", shape=(n, n_tok, dim), dtype=np.float16,
                                           chunks=(1, n_tok, dim) if n else None)
            if token_grid is not None:
                self.tokens.attrs["grid_h"], self.tokens.attrs["grid_w"] = token_grid
            if "patch_size" in attrs:
                self.tokens.attrs["patch_size"] = attrs["patch_size"]

    def append(self, features: np.ndarray, tokens: np.ndarray | None = None) -> None:
        """Write the next ``len(features)`` rows (features [B, D]; tokens [B, h*w, D])."""
        b = len(features)
        if self.row + b > self.n:
            raise ValueError(f"got {self.row + b} rows for {self.n} tiles")
        self.features[self.row:self.row + b] = features
        if self.tokens is not None:
            if tokens is None:
                raise ValueError("patch tokens missing for a file created with patch_tokens")
            self.tokens[self.row:self.row + b] = tokens.astype(np.float16)
        self.row += b

    def iter_features(self, chunk: int = 4096) -> Iterator[np.ndarray]:
        """Read back the written features in chunks (bounded memory)."""
        for start in range(0, self.row, chunk):
            yield self.features[start:min(self.row, start + chunk)]


@contextlib.contextmanager
def open_slide_h5(path: str | os.PathLike, coords: np.ndarray, feature_dim: int, attrs: dict[str, Any],
                  **kwargs) -> Iterator[SlideH5Writer]:
    """Write ``path`` atomically: a ``.<stem>.*.h5.tmp`` file beside it, renamed only when every row is in.

    A crash or kill leaves no file at ``path`` (the temp file is removed, or ignored and cleaned by
    the next run), so an existing ``<slide>.h5`` is always complete.
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        w = SlideH5Writer(f, coords, feature_dim, attrs, **kwargs)
        yield w
        if w.row != w.n:
            raise RuntimeError(f"{Path(path).name}: wrote {w.row} of {w.n} tiles")
        f.attrs["complete"] = True


def is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` is a finished slide file (readable, ``complete`` attribute set)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False)) and "features" in f and "coords" in f
    except OSError:
        return False


def clean_slide_temps(out_dir: str | os.PathLike, stem: str) -> int:
    """Remove temp files of a killed run for one slide (only its own: safe while other ranks write)."""
    n = 0
    for p in Path(out_dir).glob(f".{glob.escape(stem)}.*.h5.tmp"):
        # The random part of atomic_path's names never contains a '.', so this matches only `stem`.
        if p.name[len(stem) + 2:].count(".") == 2:
            p.unlink(missing_ok=True)
            n += 1
    return n


def read_slide_h5(path: str | os.PathLike) -> dict[str, Any]:
    """Load a slide file into memory: ``features``, ``coords`` (+ others present) and ``attrs``."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        for k in f:
            out[k] = f[k][()]
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return out

"""Tiles of one slide as a torch Dataset, one ``Slide.read`` (``read_region`` + resize) per tile.

The per-tile reference path: the TRIDENT-style baseline of ``benchmarks/embed_throughput.py``.
``openpluto embed`` reads through one pool of reader processes instead (``embed.slides``). Each
DataLoader worker opens its own slide handle lazily.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class SlideTileDataset(Dataset):
    """Tiles of ``tile_size`` px at ``mpp`` µm/px whose level-0 top-left corners are ``coords``.

    Item ``i`` is ``uint8 [3, tile_size, tile_size]`` RGB (decoding and resizing happen here, i.e. in
    the worker process). The slide is opened on first use in each process (OpenSlide handles must
    not cross a fork), so the dataset itself pickles as a path and numbers.
    """

    def __init__(self, path: str | os.PathLike, coords: np.ndarray, mpp: float, tile_size: int,
                 mpp_override: float | None = None, allow_upsample: bool = False):
        self.path = Path(path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.mpp = float(mpp)
        self.tile_size = int(tile_size)
        self.mpp_override = mpp_override
        self.allow_upsample = allow_upsample
        self._slide = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def _open(self):
        if self._slide is None or self._pid != os.getpid():
            from openpluto.slide import open_slide

            self._slide = open_slide(self.path, mpp_override=self.mpp_override)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int) -> torch.Tensor:
        x, y = (int(v) for v in self.coords[i])
        tile = self._open().read(x, y, self.tile_size, self.mpp, allow_upsample=self.allow_upsample)
        if tile.shape != (self.tile_size, self.tile_size, 3):
            raise ValueError(f"{self.path.name}: tile at ({x}, {y}) has shape {tile.shape}, expected "
                             f"({self.tile_size}, {self.tile_size}, 3)")
        if not tile.flags.writeable or not tile.flags.c_contiguous:
            tile = np.array(tile, order="C")
        return torch.from_numpy(tile).permute(2, 0, 1)

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_slide"] = None
        state["_pid"] = None
        return state


def _close_worker_slide(_worker_id: int) -> None:
    """Worker init: make sure a handle inherited through fork is never used (opened anew lazily)."""
    info = torch.utils.data.get_worker_info()
    if info is not None:
        info.dataset._slide = None


def tile_loader(dataset: SlideTileDataset, batch_size: int, workers: int, pin_memory: bool = False,
                prefetch_batches: int = 4) -> DataLoader:
    """Batches ``uint8 [B, 3, T, T]`` in dataset order; ``workers`` processes read ahead of the model."""
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": max(2, prefetch_batches // max(1, workers) + 1),
                  "worker_init_fn": _close_worker_slide}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin_memory, drop_last=False, **kwargs)

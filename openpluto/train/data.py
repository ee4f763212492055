"""Pretraining input: WebDataset tile shards or an image folder, in a deterministic, resumable order.

Order. The stream of samples is fixed by the seed alone: epoch ``e`` visits every sample once in the
order of a permutation seeded by ``(seed, e)``; stream position ``p`` is sample ``perm_e[p % N]`` with
``e = p // N``. Micro-batch ``m`` of rank ``r`` (``W`` ranks, ``B`` images each) holds positions
``m*W*B + r*B .. m*W*B + r*B + B - 1``, so ranks (nodes) split every global batch without overlap.
The augmentation RNG of a sample is seeded by ``(seed, p)``, so a view depends only on its position:
the number of DataLoader workers (which only split the work of loading a batch) and restarts do not
change what is trained on. The checkpoint stores ``m`` (``data_position``); ``--resume`` starts there.
Changing the world size or batch size on resume keeps the order of samples and re-cuts it into batches
from the number of samples seen (``samples_seen // (W*B)``; at most one partial batch is skipped).

Shards. A tiles folder (``openpluto tiles``) lists its shards and their sample counts in the union of
``manifest.csv`` and its ``--shard`` parts, so the shards of N tile jobs read as one; any other folder
counts the samples of the ``*.tar`` files below it. Samples are read in place with ``wids``
(webdataset's indexed reader: a tar's member index, then a seek per sample), so each rank and worker
reads only its own samples. Otherwise every image file under the folder (recursively) is a sample.
A sample that fails to decode is reported once and replaced by the next position's sample.

Work split. Workers decode, cut the random-resized crops as uint8 and draw every crop's augmentation
parameters (:class:`~openpluto.ssl.multicrop.MultiCropTransform`); :class:`StepMasks` adds each
micro-batch's iBOT masks; the trainer applies the augmentation batched on its device
(:class:`~openpluto.ssl.augment.BatchAugment`).
"""

from __future__ import annotations

import os
import random
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from openpluto.errors import OpenPlutoError
from openpluto.ssl.masking import sample_masks
from openpluto.ssl.meta_arch import mask_inputs
from openpluto.train.patch_sizes import patch_size_for_step

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


class DataError(OpenPlutoError):
    """The data folder holds nothing usable."""


def _mix(*ints: int) -> int:
    """Deterministic 63-bit hash of a few integers (seeds per epoch / position)."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class TileSamples(Dataset):
    """Random access to image files: index -> PIL RGB image (``find_samples`` without shards)."""

    def __init__(self, files: list[Path]) -> None:
        self.sources = list(files)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> Image.Image:
        with Image.open(self.sources[index]) as im:
            return im.convert("RGB")

    def describe(self, index: int) -> str:
        return str(self.sources[index])


class ShardSamples(Dataset):
    """Random access to the samples of WebDataset tar shards through ``wids`` (webdataset's indexed reader).

    ``shards`` is [(tar path, number of samples)] in a fixed order; index ``i`` is sample ``i`` of their
    concatenation (samples in tar order). Shards are opened lazily, a few at a time (LRU), separately
    in each DataLoader worker process, and read in place (nothing is copied or written beside them).
    """

    def __init__(self, shards: list[tuple[Path, int]], image_keys: Sequence[str] = ("jpg", "png"),
                 open_shards: int = 8) -> None:
        self.sources = [Path(p) for p, _ in shards]
        self.cum = np.cumsum([int(n) for _, n in shards]) if shards else np.zeros(0, np.int64)
        self.image_keys = tuple(image_keys)
        self.open_shards = open_shards
        self._lru, self._pid = None, -1

    def __len__(self) -> int:
        return int(self.cum[-1]) if len(self.cum) else 0

    def _shard(self, k: int):
        from wids.wids import IndexedTarSamples
        from wids.wids_lru import LRUCache

        if self._pid != os.getpid():  # fresh handles in each worker process
            self._lru = LRUCache(self.open_shards, release_handler=lambda _k, v: v.close())
            self._pid = os.getpid()
        tar = self._lru[k]
        if tar is None:
            tar = self._lru[k] = IndexedTarSamples(path=str(self.sources[k]))
        return tar

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, sample number inside it) of a global index."""
        k = int(np.searchsorted(self.cum, index, side="right"))
        return k, index - (int(self.cum[k - 1]) if k else 0)

    def __getitem__(self, index: int) -> Image.Image:
        k, inner = self.locate(index)
        sample = self._shard(k)[inner]
        for key in self.image_keys:
            if f".{key}" in sample:
                with Image.open(sample[f".{key}"]) as im:
                    return im.convert("RGB")
        raise DataError(f"{self.describe(index)}: no {'/'.join(self.image_keys)} member")

    def describe(self, index: int) -> str:
        k, inner = self.locate(index)
        return f"{self.sources[k]} sample {inner}"


def count_samples(tar: Path) -> int:
    """Number of samples in one tar shard (its index built by wids)."""
    from wids.wids import IndexedTarSamples

    t = IndexedTarSamples(path=str(tar))
    try:
        return len(t)
    finally:
        t.close()


def tiles_folder_shards(root: Path) -> list[tuple[Path, int]] | None:
    """[(shard, samples)] of an ``openpluto tiles`` folder from the union of its manifest (and manifest
    part) files, so only finished slides count and no shard is opened at start; None elsewhere."""
    from openpluto.jobs.outputs import read_csv_union

    rows = read_csv_union(root, "manifest.csv", key="key")
    if not rows:
        return None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["shard"]] = counts.get(r["shard"], 0) + 1
    return [(root / s, counts[s]) for s in sorted(counts)]


def find_samples(root: str | Path, image_keys: Sequence[str] = ("jpg", "jpeg", "png")) -> Dataset:
    """Samples under ``root``: a tiles folder (its manifests), else ``*.tar`` shards anywhere below
    (hidden folders such as ``shards/.partial`` skipped), else image files."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data DIR with shards or images")
    listed = tiles_folder_shards(root) if root.is_dir() else None
    if listed is not None:
        return ShardSamples(listed, image_keys)
    if root.is_file() and root.suffix == ".tar":
        tars = [root]
    else:
        tars = sorted(
            p for p in root.rglob("*.tar") if not any(x.startswith(".") for x in p.relative_to(root).parts)
        )
    if tars:
        shards = []
        for t in tars:
            try:
                shards.append((t, count_samples(t)))
            except Exception as e:  # noqa: BLE001 - one bad shard must not stop a long run
                warnings.warn(f"skipping unreadable shard {t} ({e})", stacklevel=2)
        ds = ShardSamples([s for s in shards if s[1] > 0], image_keys)
        if len(ds) == 0:
            keys = "/".join(image_keys)
            raise DataError(f"no image samples ({keys}) in the {len(tars)} shards under {root}")
        return ds
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"no *.tar shards or image files under {root}; run `openpluto tiles` first")
    return TileSamples(files)


class PositionViews(Dataset):
    """Stream position -> multi-crop views of its sample (see module docstring for the order)."""

    def __init__(self, samples: Dataset, transform: Callable, seed: int = 0) -> None:
        self.samples, self.transform, self.seed = samples, transform, seed
        self._perm_epoch, self._perm = -1, None
        self._warned: set[int] = set()

    def sample_index(self, position: int) -> int:
        n = len(self.samples)
        epoch = position // n
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(n, generator=g), epoch
        return int(self._perm[position % n])

    def __len__(self) -> int:  # positions are unbounded; the sampler decides
        return 2**62

    def __getitem__(self, position: int) -> dict:
        for attempt in range(16):
            idx = self.sample_index(position + attempt)
            try:
                img = self.samples[idx]
                break
            except Exception as e:  # noqa: BLE001 - a corrupt tile must not stop a long run
                if idx not in self._warned:
                    self._warned.add(idx)
                    warnings.warn(
                        f"skipping unreadable sample {self.samples.describe(idx)} ({e})", stacklevel=2
                    )
        else:
            raise DataError(f"16 unreadable samples in a row near position {position}; check the shards")
        s = _mix(self.seed, 1, position)
        # The CPU generator only: torch.manual_seed would also queue a CUDA/XPU/MTIA re-seed with a
        # formatted stack trace, a third of a worker's time per sample. The draws are the same.
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)
        out = self.transform(img)
        if isinstance(out, dict):
            out["position"] = position
        return out


class StreamSampler(Sampler[int]):
    """Positions of this rank's micro-batches, from micro-batch ``start`` on, without end."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.b, self.rank, self.world, self.start = batch_size, rank, world_size, start

    def __iter__(self) -> Iterator[int]:
        m = self.start
        while True:
            base = m * self.world * self.b + self.rank * self.b
            yield from range(base, base + self.b)
            m += 1

    def __len__(self) -> int:
        return 2**62


class StepMasks:
    """Collate function that adds each micro-batch's iBOT masks, so the loader workers draw them.

    Micro-batch ``m`` of this rank (``m = position // (world_size * batch_size)``) is micro-batch
    ``(m - start_micro_batch) % accum`` of optimizer step ``start_step + (m - start_micro_batch) // accum``;
    its masks are :func:`~openpluto.ssl.masking.sample_masks` on the grid of that step's patch size
    (:func:`~openpluto.train.patch_sizes.patch_size_for_step`) from a generator seeded by
    ``(seed, step, micro-batch, rank)``: the same masks the step would draw itself, wherever it runs.
    Adds ``masks``, ``mask_indices`` and ``mask_weights`` (:func:`~openpluto.ssl.meta_arch.mask_inputs`)
    and ``patch_size`` to the batch.
    """

    def __init__(self, collate: Callable, ssl_cfg, patch_sizes: Sequence[int], patch_size_probs,
                 seed: int, rank: int, world_size: int, batch_size: int, accum: int,
                 start_step: int, start_micro_batch: int) -> None:
        self.collate, self.cfg = collate, ssl_cfg
        self.sizes, self.probs = tuple(patch_sizes), patch_size_probs
        self.seed, self.rank, self.world, self.b, self.accum = seed, rank, world_size, batch_size, accum
        self.start_step, self.start_m = start_step, start_micro_batch

    def step_of(self, micro_batch: int) -> tuple[int, int]:
        """(optimizer step, micro-batch within it) of this rank's micro-batch number ``micro_batch``."""
        k = micro_batch - self.start_m
        return self.start_step + k // self.accum, k % self.accum

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collate(samples)
        step, micro = self.step_of(samples[0]["position"] // (self.world * self.b))
        patch = patch_size_for_step(step, self.sizes, self.probs, self.seed)
        batch["patch_size"] = patch
        crops = self.cfg.crops
        if self.cfg.uses_ibot():
            grid = (crops.global_size // patch, crops.global_size // patch)
            gen = torch.Generator().manual_seed(_mix(self.seed, 3, step, micro, self.rank))
            batch.update(mask_inputs(sample_masks(crops.n_global * len(samples), grid, self.cfg.masks, gen)))
        return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the trainer, which finishes its step and checkpoints
    (a scheduler signals every process of the job; workers exit with their parent)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def build_loader(
    samples: Dataset,
    transform: Callable,
    collate: Callable,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    start_micro_batch: int,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """Endless DataLoader of collated multi-crop micro-batches starting at ``start_micro_batch``."""
    views = PositionViews(samples, transform, seed)
    sampler = StreamSampler(batch_size, rank, world_size, start_micro_batch)
    kwargs = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": True,
                  "worker_init_fn": _ignore_stop_signals}
    return DataLoader(
        views,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=True,
        **kwargs,
    )

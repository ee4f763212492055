"""Embed patch datasets (image folders or CSVs) with a frozen encoder, eva-style preprocessing.

Accepted layouts:

* ``ROOT/<class>/*.png`` — class sub-folders (no split; the evaluation makes a seeded stratified one);
* ``ROOT/{train,val,test}/<class>/*.png`` — split sub-folders, then class sub-folders;
* a CSV with columns ``path,label[,split]`` (paths relative to the CSV's folder or absolute).

Preprocessing (eva): resize the shorter side to ``resize`` px (``RESIZE_INTERPOLATION``: bilinear,
antialiased, the filter exported timm configs name), centre-crop a ``resize`` x ``resize`` square,
scale to 0..1, normalise with the encoder's mean/std.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from openpluto.errors import OpenPlutoError
from openpluto.model.config import RESIZE_INTERPOLATION

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def normalise_split(value: str, where: str) -> str:
    """``train``/``val``/``test`` (also training, valid, validation, testing), else an error at ``where``."""
    s = _SPLIT_ALIASES.get(str(value).strip().lower())
    if s is None:
        raise OpenPlutoError(f"{where}: split '{value}' is not one of train, val, test")
    return s


@dataclass
class ImageRecords:
    """A labelled image list. ``labels`` are integer ids into ``classes``; ``splits`` holds
    ``train``/``val``/``test`` per image, or ``""`` everywhere when the source has no split."""

    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    splits: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.splits:
            self.splits = [""] * len(self.paths)
        if not (len(self.paths) == len(self.labels) == len(self.splits)):
            raise ValueError("paths, labels and splits must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_split(self) -> bool:
        return all(s in SPLITS for s in self.splits) and len(self) > 0

    def subset(self, index: np.ndarray | list[int]) -> ImageRecords:
        index = list(np.asarray(index, dtype=np.int64))
        return ImageRecords(
            [self.paths[i] for i in index],
            self.labels[index],
            list(self.classes),
            [self.splits[i] for i in index],
            self.source,
        )

    def fingerprint(self) -> str:
        """sha256 over (path relative to the source, file size, label name, split) of every image.

        Cheap (no pixel reads); changes when files are added, removed, renamed, resized, relabelled
        or moved between splits.
        """
        root = Path(self.source)
        base = root if root.is_dir() else root.parent
        h = hashlib.sha256()
        for p, lab, s in zip(self.paths, self.labels.tolist(), self.splits):
            try:
                rel = os.path.relpath(p, base)
            except ValueError:
                rel = p
            size = os.path.getsize(p) if os.path.exists(p) else -1
            h.update(f"{rel}\t{size}\t{self.classes[lab]}\t{s}\n".encode())
        return h.hexdigest()

    @classmethod
    def from_source(cls, source: str | os.PathLike) -> ImageRecords:
        """Folder (with or without split folders) or CSV, chosen by what ``source`` is."""
        source = Path(source)
        if source.is_dir():
            return cls.from_folder(source)
        if source.is_file() and source.suffix.lower() == ".csv":
            return cls.from_csv(source)
        raise OpenPlutoError(
            f"{source}: not an image folder or a .csv file (give ROOT/<class>/* or path,label CSV)"
        )

    @classmethod
    def from_folder(cls, root: str | os.PathLike) -> ImageRecords:
        root = Path(root)
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        split_dirs = [d for d in subdirs if d.name.lower() in _SPLIT_ALIASES]
        if split_dirs:
            if len(split_dirs) != len(subdirs):
                other = [d.name for d in subdirs if d not in split_dirs]
                raise OpenPlutoError(
                    f"{root}: mixes split folders with other folders {other[:3]}; "
                    "use either ROOT/<class>/ or ROOT/{train,val,test}/<class>/"
                )
            items = []
            for d in split_dirs:
                split = normalise_split(d.name, str(d))
                for c in sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
                    items += [(str(p), c.name, split) for p in sorted(c.iterdir()) if _is_image(p)]
        else:
            items = []
            for c in subdirs:
                items += [(str(p), c.name, "") for p in sorted(c.iterdir()) if _is_image(p)]
        if not items:
            raise OpenPlutoError(
                f"{root}: no images found (expected ROOT/<class>/*.png or "
                "ROOT/{train,val,test}/<class>/*.png)"
            )
        classes = sorted({c for _, c, _ in items})
        index = {c: i for i, c in enumerate(classes)}
        return cls(
            [p for p, _, _ in items],
            np.array([index[c] for _, c, _ in items]),
            classes,
            [s for _, _, s in items],
            str(root),
        )

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> ImageRecords:
        path = Path(path)
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in cols or "label" not in cols:
                raise OpenPlutoError(f"{path}: needs a header with columns path,label[,split] (found {cols})")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
        if not rows:
            raise OpenPlutoError(f"{path}: no rows")
        has_split = "split" in cols
        paths, names, splits = [], [], []
        for i, r in enumerate(rows, start=2):
            p = Path(r["path"])
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                raise OpenPlutoError(f"{path} line {i}: image {p} does not exist")
            paths.append(str(p))
            names.append(r["label"])
            splits.append(normalise_split(r["split"], f"{path} line {i}") if has_split else "")
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        return cls(paths, np.array([index[c] for c in names]), classes, splits, str(path))


def load_image(path: str, resize: int) -> np.ndarray:
    """RGB uint8 ``[resize, resize, 3]``: shorter side resized to ``resize`` then centre-cropped."""
    from PIL import Image

    resample = getattr(Image.Resampling, RESIZE_INTERPOLATION.upper())  # antialiased when downscaling
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resize / min(w, h)
            nw, nh = max(resize, round(w * s)), max(resize, round(h * s))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), resample, reducing_gap=None)
            left, top = (nw - resize) // 2, (nh - resize) // 2
            im = im.crop((left, top, left + resize, top + resize))
            return np.array(im, dtype=np.uint8)
    except OSError as e:
        raise OpenPlutoError(f"{path}: cannot read image ({e})") from None


class _ImageDataset:
    """Decodes one image per item -> (uint8 [3, H, W], error message or "")."""

    def __init__(self, paths: list[str], resize: int):
        self.paths, self.resize = paths, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        try:
            arr = load_image(self.paths[i], self.resize)
            return torch.from_numpy(arr).permute(2, 0, 1), ""
        except OpenPlutoError as e:
            return torch.zeros(3, self.resize, self.resize, dtype=torch.uint8), str(e)


def _collate(items):
    import torch

    return torch.stack([x for x, _ in items]), [e for _, e in items]


def iter_image_batches(
    paths: list[str], resize: int = 224, batch_size: int = 64, workers: int = 0, progress: str | None = None
):
    """Yield ``(uint8 [B, 3, resize, resize], errors list[str])`` in order; decoding runs in
    ``workers`` processes. ``errors[i]`` is ``""`` for a good image, else a one-line message."""
    from torch.utils.data import DataLoader

    from openpluto.progress import progress as progress_bar

    loader = DataLoader(
        _ImageDataset(paths, resize),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        collate_fn=_collate,
    )
    with progress_bar(
        total=len(paths), desc=progress or "images", unit="img", disable=progress is None, leave=False
    ) as bar:
        for batch, errors in loader:
            yield batch, errors
            bar.update(len(batch))


def normalise(batch_uint8, mean, std, device="cpu"):
    """uint8 ``[B, 3, H, W]`` -> float32 normalised with the encoder's ``mean``/``std`` (0..1 RGB)."""
    import torch

    x = batch_uint8.to(device=device, dtype=torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def _encoder_device(encoder) -> str:
    try:
        return str(next(encoder.parameters()).device)
    except (StopIteration, AttributeError):
        return "cpu"


def embed_images(
    encoder,
    records: ImageRecords,
    patch_size: int | None = None,
    pooling: str = "cls",
    batch_size: int = 64,
    workers: int = 0,
    resize: int = 224,
    progress: bool = True,
    errors: list[tuple[str, str]] | None = None,
):
    """Embed every image of ``records`` with ``encoder.embed`` (eva preprocessing, see module doc).

    Returns ``(features float32 [N, D], labels int64 [N], paths list[str], splits list[str])`` in the
    order of ``records``; ``D`` is ``encoder.embed_dim_for(pooling)`` (2x width for ``cls+mean``).
    An unreadable image raises ``OpenPlutoError`` unless ``errors`` is a list: then it is appended as
    ``(path, message)`` and left out of the outputs.
    """
    import torch

    if len(records) == 0:
        raise OpenPlutoError(f"{records.source or 'records'}: no images to embed")
    device = _encoder_device(encoder)
    feats, keep = [], []
    start = 0
    with torch.inference_mode():
        for batch, errs in iter_image_batches(
            records.paths, resize, batch_size, workers, progress="embed-images" if progress else None
        ):
            ok = [i for i, e in enumerate(errs) if not e]
            for i, e in enumerate(errs):
                if e:
                    if errors is None:
                        raise OpenPlutoError(e)
                    errors.append((records.paths[start + i], e))
            if ok:
                x = normalise(batch[ok], encoder.mean, encoder.std, device)
                f = encoder.embed(x, patch_size=patch_size, pooling=pooling)
                feats.append(f.float().cpu().numpy())
                keep += [start + i for i in ok]
            start += len(errs)
    if not keep:
        raise OpenPlutoError(f"{records.source or 'records'}: no image could be read")
    features = np.concatenate(feats, 0).astype(np.float32, copy=False)
    kept = records.subset(keep)
    return features, kept.labels, kept.paths, kept.splits


def save_image_features(
    path: str | os.PathLike, features: np.ndarray, records: ImageRecords, attrs: dict
) -> None:
    """Write ``features`` [N,D], ``labels`` [N], ``paths``/``splits`` (strings), ``classes`` and
    ``attrs`` to an HDF5 file atomically."""
    import h5py

    from openpluto.io import atomic_path

    str_dt = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=np.asarray(features, np.float32))
        f.create_dataset("labels", data=records.labels)
        f.create_dataset("paths", data=np.array(records.paths, dtype=object), dtype=str_dt)
        f.create_dataset("splits", data=np.array(records.splits, dtype=object), dtype=str_dt)
        f.create_dataset("classes", data=np.array(records.classes, dtype=object), dtype=str_dt)
        for k, v in attrs.items():
            f.attrs[k] = "" if v is None else v


def load_image_features(path: str | os.PathLike) -> tuple[np.ndarray, ImageRecords, dict]:
    """Read a file written by ``save_image_features`` -> (features, records, attrs)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise OpenPlutoError(f"{path}: features file does not exist (make it with `openpluto embed-images`)")
    with h5py.File(path, "r") as f:
        for key in ("features", "labels", "paths", "classes"):
            if key not in f:
                raise OpenPlutoError(
                    f"{path}: missing dataset '{key}' (not an `openpluto embed-images` file)"
                )
        feats = f["features"][()].astype(np.float32)
        labels = f["labels"][()]
        paths = [s.decode() if isinstance(s, bytes) else str(s) for s in f["paths"][()]]
        splits = (
            [s.decode() if isinstance(s, bytes) else str(s) for s in f["splits"][()]]
            if "splits" in f
            else [""] * len(paths)
        )
        classes = [s.decode() if isinstance(s, bytes) else str(s) for s in f["classes"][()]]
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    rec = ImageRecords(paths, labels, classes, splits, str(attrs.get("source", "")))
    return feats, rec, attrs

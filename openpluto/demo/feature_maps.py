"""Feature maps that can be checked: tile embeddings of synthetic slides against their ground truth.

The encoder is used as the evaluation uses it: a ``tile_px`` window at ``mpp`` gives one embedding
(its CLS token). Sliding the window over a region gives a feature map; each window is labelled with
the ground-truth class of its central half when at least 60% of that area is one usable class.

- ``pick_crop`` finds, on each slide, the square window of its class map that holds the most tissue
  classes; ``crop_map`` embeds it densely (for the picture, coloured by PCA).
- ``slide_windows`` + ``cross_slide_knn`` give the number: every labelled window of every slide is
  classified by a 20-NN (cosine) on the windows of the *other* slides (other stains, other tissue),
  and the balanced accuracy is reported for the pretrained encoder and its random-init twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASS_COLOURS = ((214, 39, 40), (255, 187, 120), (31, 119, 180), (255, 235, 140), (44, 160, 44),
                 (140, 86, 75), (148, 103, 189), (23, 190, 207))
NO_LABEL_COLOUR = (200, 200, 200)
MIN_PURITY = 0.6


@dataclass
class Crop:
    slide: Path
    x: int  # level-0 top-left
    y: int
    size_l0: int  # level-0 px per side
    n_classes: int  # classes covering >= 8% of the crop


@dataclass
class CropMap:
    """A crop (``image`` uint8 [S, S, 3] at the map's µm/px) and each encoder's window embeddings."""

    crop: Crop
    image: np.ndarray
    offset: int  # px from the crop's edge to the centre of the first window
    stride: int  # px between window centres
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # encoder -> float32 [h, w, D]


def pick_crop(truth, size_l0: int, min_usable: float = 0.75, min_share: float = 0.08) -> Crop | None:
    """The window of ``size_l0`` level-0 px with the most classes (each >= ``min_share``), then the most
    even mix, among windows with >= ``min_usable`` artifact-free tissue; None if none qualifies."""
    lab = truth.labels()
    t = truth.downsample
    win = max(4, int(round(size_l0 / t)))
    h, w = lab.shape
    if win > min(h, w):
        return None
    k = len(truth.classes)
    onehot = np.stack([lab == c for c in range(k)], 0).astype(np.int32)
    csum = np.pad(onehot.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    best, best_key = None, None
    stride = max(1, win // 8)
    for y0 in range(0, h - win + 1, stride):
        for x0 in range(0, w - win + 1, stride):
            y1, x1 = y0 + win, x0 + win
            counts = csum[:, y1, x1] - csum[:, y0, x1] - csum[:, y1, x0] + csum[:, y0, x0]
            if counts.sum() < min_usable * win * win:
                continue
            share = counts / counts.sum()
            nz = share[share > 0]
            key = (int((share >= min_share).sum()), float(-(nz * np.log(nz)).sum()))
            if best_key is None or key > best_key:
                best_key, best = key, (x0, y0, key[0])
    if best is None:
        return None
    x0, y0, n = best
    return Crop(Path(truth.path), int(x0 * t), int(y0 * t), int(size_l0), n)


def window_label(truth, x: float, y: float, size_l0: float) -> int:
    """Ground-truth class of the central half of the level-0 window (x, y, size_l0); -1 when no class
    covers ``MIN_PURITY`` of it or it is background/artifact."""
    sy, sx = truth.box(x + size_l0 / 4, y + size_l0 / 4, size_l0 / 2)
    cell = truth.labels()[sy, sx].ravel()
    if not cell.size:
        return -1
    counts = np.bincount(cell + 1, minlength=len(truth.classes) + 1)
    c = int(counts.argmax())
    return c - 1 if c > 0 and counts[c] >= MIN_PURITY * cell.size else -1


def windows(image: np.ndarray, tile_px: int, stride: int) -> tuple[np.ndarray, tuple[int, int]]:
    """All ``tile_px`` windows of ``image`` [H, W, 3] ``stride`` px apart: ([n, T, T, 3], (rows, cols))."""
    rows = (image.shape[0] - tile_px) // stride + 1
    cols = (image.shape[1] - tile_px) // stride + 1
    out = np.stack([image[i * stride:i * stride + tile_px, j * stride:j * stride + tile_px]
                    for i in range(rows) for j in range(cols)])
    return out, (rows, cols)


def embed_windows(encoder, wins: np.ndarray, batch: int = 256) -> np.ndarray:
    """CLS embeddings ``float32 [n, D]`` of uint8 windows ``[n, T, T, 3]`` (normalised as in ``embed``)."""
    import torch

    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for s in range(0, len(wins), batch):
            x = torch.from_numpy(np.ascontiguousarray(wins[s:s + batch])).permute(0, 3, 1, 2).float() / 255.0
            out.append(encoder.embed((x - mean) / std).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.embed_dim), np.float32)


def slide_windows(path: Path, mpp: float, tile_px: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """The labelled windows of a whole synthetic slide at ``mpp``: (uint8 [n, T, T, 3], labels [n])."""
    from openpluto.demo.synthetic import load_truth
    from openpluto.slide import open_slide

    truth = load_truth(path)
    f = mpp / truth.mpp  # level-0 px per px at mpp
    w, h = truth.dimensions
    with open_slide(path) as slide:
        image = slide.read(0, 0, (int(w / f), int(h / f)), mpp)
    wins, (rows, cols) = windows(image, tile_px, stride)
    labels = np.array([window_label(truth, j * stride * f, i * stride * f, tile_px * f)
                       for i in range(rows) for j in range(cols)])
    keep = labels >= 0
    return wins[keep], labels[keep]


def crop_map(encoder, image: np.ndarray, tile_px: int, stride: int) -> np.ndarray:
    """Window embeddings over ``image`` as a map ``float32 [rows, cols, D]``."""
    wins, (rows, cols) = windows(image, tile_px, stride)
    return embed_windows(encoder, wins).reshape(rows, cols, -1)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def knn_classes(train_x: np.ndarray, train_y: np.ndarray, query: np.ndarray, n_classes: int,
                k: int = 20) -> np.ndarray:
    """Majority class of each query row's ``k`` nearest training rows (cosine): int [n]."""
    nn = np.argsort(-(_unit(query) @ _unit(train_x).T), axis=1)[:, :k]
    votes = np.zeros((len(query), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(query)), nn.shape[1]), train_y[nn].ravel()), 1.0)
    return votes.argmax(1)


def others(items: list[np.ndarray], i: int) -> np.ndarray:
    """``items`` of every slide but ``i``, concatenated."""
    return np.concatenate([a for j, a in enumerate(items) if j != i])


def cross_slide_knn(feats: list[np.ndarray], labels: list[np.ndarray], n_classes: int, k: int = 20) -> float:
    """Balanced accuracy of a cosine ``k``-NN on ``feats[i]`` trained on all the other slides' windows."""
    from openpluto.eval.metrics import balanced_accuracy

    preds = [knn_classes(others(feats, i), others(labels, i), feats[i], n_classes, k)
             for i in range(len(feats))]
    return float(balanced_accuracy(np.concatenate(labels), np.concatenate(preds)))


def class_map_rgb(labels: np.ndarray) -> np.ndarray:
    """Class indices [h, w] (-1 = none) -> uint8 RGB in ``CLASS_COLOURS``."""
    lut = np.array([NO_LABEL_COLOUR, *CLASS_COLOURS], np.uint8)
    return lut[np.clip(labels + 1, 0, len(lut) - 1)]

"""Feature maps that can be checked: patch features of a multi-class crop against the ground truth.

For each synthetic slide, ``pick_crop`` finds the square window of its ground-truth class map that
holds the most tissue classes (artifact-free tissue only). The crop is read at ``mpp``, cut into
``tile_px`` tiles (the size the encoder was evaluated at) and each tile's patch tokens are stitched
back into one map. Each token gets the majority ground-truth class of the area it covers
(``token_labels``; mixed or artifact tokens are left out). Two numbers then say how well the
features follow the classes, for the pretrained encoder and its random-init twin:

- ``class_variance_share``: the share of the feature variance explained by the classes (η², the
  between-class sum of squares over the total, summed over feature dimensions);
- ``cross_slide_knn``: balanced accuracy of a 20-NN (cosine) classifier of token features, each
  slide's tokens classified from the other slides' (leave one slide out: other stains, other tissue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASS_COLOURS = ((214, 39, 40), (255, 187, 120), (31, 119, 180), (255, 235, 140), (44, 160, 44),
                 (140, 86, 75), (148, 103, 189), (23, 190, 207))
NO_LABEL_COLOUR = (200, 200, 200)


@dataclass
class Crop:
    slide: Path
    x: int  # level-0 top-left
    y: int
    size_l0: int  # level-0 px per side
    n_classes: int  # classes covering >= 8% of the crop


@dataclass
class CropFeatures:
    crop: Crop
    image: np.ndarray  # uint8 [S, S, 3] at the feature-map µm/px
    labels: np.ndarray  # int [h, w] ground-truth class per token, -1 = left out
    tokens: dict[str, np.ndarray] = field(default_factory=dict)  # encoder -> float32 [h, w, D]


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
            usable = counts.sum() / (win * win)
            if usable < min_usable:
                continue
            share = counts / counts.sum()
            n = int((share >= min_share).sum())
            entropy = float(-(share[share > 0] * np.log(share[share > 0])).sum())
            key = (n, entropy)
            if best_key is None or key > best_key:
                best_key, best = key, (x0, y0, n)
    if best is None:
        return None
    x0, y0, n = best
    return Crop(Path(truth.path), int(x0 * t), int(y0 * t), int(size_l0), n)


def token_labels(truth, crop: Crop, grid: tuple[int, int], min_purity: float = 0.6) -> np.ndarray:
    """Majority ground-truth class of each token's area, int [h, w]; -1 where it is below
    ``min_purity`` of the area or not usable tissue."""
    gh, gw = grid
    lab = truth.labels()
    step = crop.size_l0 / gw
    out = np.full((gh, gw), -1, np.int64)
    k = len(truth.classes)
    for i in range(gh):
        for j in range(gw):
            sy, sx = truth.box(crop.x + j * step, crop.y + i * step, step)
            cell = lab[sy, sx].ravel()
            if not cell.size:
                continue
            counts = np.bincount(cell + 1, minlength=k + 1)
            c = int(counts.argmax())
            if c > 0 and counts[c] >= min_purity * cell.size:
                out[i, j] = c - 1
    return out


def tile_tokens(encoder, image: np.ndarray, tile_px: int, patch: int) -> np.ndarray:
    """Patch tokens of ``image`` [S, S, 3] embedded as ``tile_px`` tiles and stitched: float32
    [S/patch, S/patch, D]."""
    from openpluto.embed.pictures import encoder_tokens

    s = image.shape[0]
    n = s // tile_px
    tiles = [image[i * tile_px:(i + 1) * tile_px, j * tile_px:(j + 1) * tile_px]
             for i in range(n) for j in range(n)]
    tokens, (gh, gw) = encoder_tokens(encoder, np.stack(tiles), patch_size=patch)
    t = tokens.numpy().reshape(n, n, gh, gw, -1).transpose(0, 2, 1, 3, 4)
    return t.reshape(n * gh, n * gw, -1).astype(np.float32)


def class_variance_share(feats: np.ndarray, labels: np.ndarray) -> float:
    """η²: between-class over total sum of squares of ``feats`` [N, D] (summed over dimensions)."""
    x = np.asarray(feats, np.float64)
    mu = x.mean(0)
    total = float(((x - mu) ** 2).sum())
    between = sum(float((labels == c).sum()) * float(((x[labels == c].mean(0) - mu) ** 2).sum())
                  for c in np.unique(labels))
    return between / total if total > 0 else 0.0


def cross_slide_knn(feats: list[np.ndarray], labels: list[np.ndarray], n_classes: int, k: int = 20) -> float:
    """Balanced accuracy of a cosine ``k``-NN on ``feats[i]`` trained on all the other slides' tokens."""
    from openpluto.eval.metrics import balanced_accuracy

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    ys, preds = [], []
    for i in range(len(feats)):
        train_x = unit(np.concatenate([f for j, f in enumerate(feats) if j != i]))
        train_y = np.concatenate([y for j, y in enumerate(labels) if j != i])
        q = unit(feats[i])
        sims = q @ train_x.T
        nn = np.argsort(-sims, axis=1)[:, :k]
        votes = np.zeros((len(q), n_classes))
        np.add.at(votes, (np.arange(len(q))[:, None].repeat(nn.shape[1], 1), train_y[nn]), 1.0)
        ys.append(labels[i])
        preds.append(votes.argmax(1))
    return float(balanced_accuracy(np.concatenate(ys), np.concatenate(preds)))


def crop_features(slides: list[Path], models: dict[str, Path], mpp: float, crop_px: int, tile_px: int,
                  patch: int) -> list[CropFeatures]:
    """``CropFeatures`` of the best multi-class crop of each synthetic slide, for each encoder.

    Crops are ``crop_px`` px at ``mpp`` (a multiple of ``tile_px``), or smaller where a small slide
    has no such window of usable tissue."""
    import torch

    from openpluto.demo.synthetic import load_truth, truth_path
    from openpluto.model import load_encoder
    from openpluto.slide import open_slide

    encoders = {name: load_encoder(str(path)) for name, path in models.items()}
    out = []
    for path in slides:
        if not truth_path(path).is_file():
            continue
        truth = load_truth(path)
        sizes = range(crop_px, tile_px - 1, -tile_px)
        crop, size = next(((c, s) for s in sizes if (c := pick_crop(truth, int(round(s * mpp / truth.mpp))))),
                          (None, 0))
        if crop is None:
            continue
        with open_slide(path) as slide:
            image = slide.read(crop.x, crop.y, size, mpp)
        cf = CropFeatures(crop, image, np.zeros((0, 0), np.int64))
        with torch.inference_mode():
            for name, enc in encoders.items():
                cf.tokens[name] = tile_tokens(enc, image, tile_px, patch)
        grid = next(iter(cf.tokens.values())).shape[:2]
        cf.labels = token_labels(truth, crop, grid)
        out.append(cf)
    return out


def separation(crops: list[CropFeatures], n_classes: int) -> dict[str, dict[str, float]]:
    """Per encoder: ``{"variance_share", "knn"}`` over the labelled tokens of all crops (``knn`` is
    NaN with fewer than two crops)."""
    out = {}
    for name in crops[0].tokens:
        feats = [c.tokens[name][c.labels >= 0] for c in crops]
        labels = [c.labels[c.labels >= 0] for c in crops]
        allf, ally = np.concatenate(feats), np.concatenate(labels)
        knn = cross_slide_knn(feats, labels, n_classes) if len(crops) > 1 else math.nan
        out[name] = {"variance_share": class_variance_share(allf, ally), "knn": knn,
                     "tokens": int(len(ally))}
    return out


def class_map_rgb(labels: np.ndarray) -> np.ndarray:
    """Class indices [h, w] (-1 = none) -> uint8 RGB in ``CLASS_COLOURS``."""
    lut = np.array([NO_LABEL_COLOUR, *CLASS_COLOURS], np.uint8)
    return lut[np.clip(labels + 1, 0, len(lut) - 1)]

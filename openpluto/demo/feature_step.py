"""The demo's feature-map step: do the encoders' features follow the ground-truth tissue classes?

- The number: every labelled ``eval_size`` window of every synthetic slide (at the embedding µm/px,
  side by side) is embedded by both encoders and classified by a 20-NN on the other
  slides' windows (``feature_maps.cross_slide_knn``).
- The picture: on each slide, the crop with the most tissue classes, embedded window by window
  (``MAP_STRIDE`` px apart), beside its ground-truth classes. Per encoder, two maps: the windows
  coloured by the first three principal components of their embeddings (one PCA per encoder over
  the tissue windows of the crops shown), and each window's class by 20-NN among the other slides'
  windows (what the number counts). Background and artifacts are grey.
- ``openpluto embed-pca`` draws the patch-token PCA of the first crop for both encoders (the command
  a user would run for their own slides).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from openpluto.demo.commands import CommandLog
from openpluto.demo.config import DemoConfig

CROP_PX = 512  # largest crop side at the map's µm/px
MAP_STRIDE = 16  # px between window centres in the pictures
SHOWN = 3  # crops drawn


def _crop(truth, mpp: float, tile_px: int):
    """The best multi-class crop of ``CROP_PX`` px at ``mpp``, smaller on a small slide: (Crop, px)."""
    from openpluto.demo.feature_maps import pick_crop

    for px in range(CROP_PX, 2 * tile_px - 1, -tile_px):
        crop = pick_crop(truth, int(round(px * mpp / truth.mpp)))
        if crop is not None:
            return crop, px
    return None, 0


def _map_labels(truth, crop, mpp: float, tile_px: int, grid: tuple[int, int]) -> np.ndarray:
    """Ground-truth class of each map window (-1 for background, artifacts, mixed), int [rows, cols]."""
    from openpluto.demo.feature_maps import window_label

    f = mpp / truth.mpp
    return np.array([[window_label(truth, crop.x + j * MAP_STRIDE * f, crop.y + i * MAP_STRIDE * f,
                                   tile_px * f) for j in range(grid[1])] for i in range(grid[0])])


def _pca_rgb(maps: list[np.ndarray], labels: list[np.ndarray]) -> list[np.ndarray]:
    """PC 1-3 of the labelled windows of all ``maps`` (one PCA) as RGB; unlabelled windows grey."""
    from openpluto.demo.feature_maps import NO_LABEL_COLOUR
    from openpluto.embed.pictures import patch_pca_rgb

    keep = np.concatenate([lab.ravel() >= 0 for lab in labels])
    flat = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps])
    rgb = np.tile(np.array(NO_LABEL_COLOUR, np.float32) / 255, (len(flat), 1))
    if keep.sum() > 3:
        rgb[keep] = patch_pca_rgb(flat[keep][None], (1, int(keep.sum())))[0, 0]
    parts = np.split(rgb, np.cumsum([lab.size for lab in labels])[:-1])
    return [p.reshape(*lab.shape, 3) for p, lab in zip(parts, labels)]


def _map_rows(slides: list[Path], encoders: dict, mpp: float, tile_px: int,
              feats: dict[str, list[np.ndarray]], labels: list[np.ndarray], n_classes: int):
    """(crops, a ``MapRow`` per crop) for up to ``SHOWN`` slides: per encoder, the PCA of the window
    embeddings and each window's class by 20-NN among the *other* slides' windows (``feats``)."""
    from openpluto.demo.feature_maps import class_map_rgb, crop_map, knn_classes, others
    from openpluto.demo.figures import MapRow
    from openpluto.demo.synthetic import load_truth
    from openpluto.slide import open_slide

    crops, images, truths, wlabels = [], [], [], []
    maps: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    classes: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    for i, path in enumerate(slides):
        truth = load_truth(path)
        crop, px = _crop(truth, mpp, tile_px)
        if crop is None:
            continue
        with open_slide(path) as slide:
            image = slide.read(crop.x, crop.y, px, mpp)
        sy, sx = truth.box(crop.x, crop.y, crop.size_l0)
        for name, enc in encoders.items():
            m = crop_map(enc, image, tile_px, MAP_STRIDE)
            maps[name].append(m)
            flat = m.reshape(-1, m.shape[-1])
            pred = knn_classes(others(feats[name], i), others(labels, i), flat, n_classes)
            classes[name].append(pred.reshape(m.shape[:2]))
        lab = _map_labels(truth, crop, mpp, tile_px, m.shape[:2])
        crops.append(crop)
        images.append(image)
        truths.append(class_map_rgb(truth.labels()[sy, sx]))
        wlabels.append(lab)
        if len(crops) == SHOWN:
            break
    pca = {name: _pca_rgb(maps[name], wlabels) for name in encoders}
    rows = []
    for i, (crop, image) in enumerate(zip(crops, images)):
        h, w = wlabels[i].shape
        lo = tile_px / 2 - MAP_STRIDE / 2
        panels = []
        for name in encoders:
            predicted = np.where(wlabels[i] >= 0, classes[name][i], -1)
            panels += [pca[name][i], class_map_rgb(predicted)]
        rows.append(MapRow(crop.slide.stem, image, truths[i], panels,
                           (lo, lo + w * MAP_STRIDE, lo + h * MAP_STRIDE, lo)))
    return crops, rows


def _earlier(figs: Path, mpp: float, tile_px: int, n_slides: int) -> dict | None:
    """What an earlier invocation measured with the same settings, if its files are all there."""
    try:
        d = json.loads((figs / "feature_maps.json").read_text())
    except (OSError, ValueError):
        return None
    same = (d.get("mpp"), d.get("tile_px"), d.get("slides")) == (mpp, tile_px, n_slides)
    return d if same and "commands" in d and (figs / "feature_maps.png").is_file() else None


def run_feature_maps(cfg: DemoConfig, out: Path, slides: list[Path], models: dict[str, Path],
                     log: CommandLog) -> dict | None:
    """``out/figures/feature_maps.png`` and ``feature_maps.json``; None without synthetic ground truth."""
    from openpluto.demo.feature_maps import cross_slide_knn, embed_windows, slide_windows
    from openpluto.demo.figures import feature_map_figure
    from openpluto.demo.synthetic import load_truth, truth_path
    from openpluto.model import load_encoder

    synthetic = [p for p in slides if truth_path(p).is_file()]
    if not synthetic:
        print("no synthetic ground truth beside the slides: no feature maps to check")
        return None
    mpp, tile = cfg.mpp[-1], cfg.eval_size
    figs = out / "figures"
    earlier = _earlier(figs, mpp, tile, len(synthetic))
    if earlier is not None:  # the demo deletes figures/ when the encoder changes
        for argv in earlier["commands"]:
            log.skip(argv, "figures/feature_maps.json exists")
        return earlier
    classes = load_truth(synthetic[0]).classes
    encoders = {name: load_encoder(str(path)) for name, path in models.items()}
    feats: dict[str, list[np.ndarray]] = {name: [] for name in encoders}
    labels = []
    for path in synthetic:
        wins, lab = slide_windows(path, mpp, tile, tile)  # side by side: independent windows
        labels.append(lab)
        for name, enc in encoders.items():
            feats[name].append(embed_windows(enc, wins))
    knn = {name: cross_slide_knn(f, labels, len(classes)) if len(synthetic) > 1 else math.nan
           for name, f in feats.items()}
    crops, rows = _map_rows(synthetic, encoders, mpp, tile, feats, labels, len(classes))
    commands = []
    if crops:
        first = crops[0]
        for name, model in models.items():
            commands.append(["embed-pca", str(first.slide), "--model", str(model), "--out",
                             str(figs / f"pca_{name}.png"), "--mpp", str(mpp), "--size",
                             str(rows[0].image.shape[0]), "--x", str(first.x), "--y", str(first.y)])
            log.run(commands[-1])
        titles = [t for name in models
                  for t in (f"{name}:\nfeatures (PCA)", f"{name}: classes,\n20-NN ({knn[name]:.2f})")]
        feature_map_figure(rows, titles, classes, figs / "feature_maps.png")
    result = {
        "knn": knn, "windows": int(sum(len(lab) for lab in labels)), "slides": len(synthetic),
        "n_classes": len(classes), "mpp": mpp, "tile_px": tile, "slide_stride_px": tile,
        "map_stride_px": MAP_STRIDE,
        "crops": [{"slide": c.slide.name, "x": c.x, "y": c.y, "size_l0": c.size_l0, "classes": c.n_classes}
                  for c in crops],
        "commands": commands,
    }
    figs.mkdir(parents=True, exist_ok=True)
    (figs / "feature_maps.json").write_text(json.dumps(result, indent=2) + "\n")
    print("feature maps: windows of each slide classified from the other slides' (20-NN), balanced "
          "accuracy " + ", ".join(f"{name} {v:.3f}" for name, v in knn.items()))
    return result

"""The demo's feature-map step: pretrained vs random feature maps on multi-class crops, with numbers.

``openpluto embed-pca`` draws the pretrained and random maps of the first slide's crop (the command a
user would run); the demo then embeds the best multi-class crop of every synthetic slide with both
encoders, measures how well the features follow the ground-truth classes (``feature_maps.separation``)
and draws one figure: image, ground truth, pretrained map, random map.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from openpluto.demo.commands import CommandLog
from openpluto.demo.config import DemoConfig

CROP_PX = 512  # side of each crop at the map's µm/px
PATCH = 8
SHOWN = 3  # crops drawn in the figure (all are measured)


def _truth_rgb(truth, crop) -> np.ndarray:
    from openpluto.demo.feature_maps import class_map_rgb

    sy, sx = truth.box(crop.x, crop.y, crop.size_l0)
    return class_map_rgb(truth.labels()[sy, sx])


def run_feature_maps(cfg: DemoConfig, out: Path, slides: list[Path], models: dict[str, Path],
                     log: CommandLog) -> dict | None:
    """Figures in ``out/figures`` and ``out/figures/feature_maps.json``; None without ground truth."""
    from openpluto.demo.feature_maps import crop_features, separation
    from openpluto.demo.figures import feature_map_figure
    from openpluto.demo.synthetic import load_truth
    from openpluto.embed.pictures import patch_pca_rgb

    figs = out / "figures"
    mpp = cfg.mpp[-1]
    crops = crop_features(slides, models, mpp, CROP_PX, cfg.eval_size, PATCH)
    if not crops:
        print("no synthetic ground truth beside the slides: feature maps without numbers")
        return None
    first = crops[0].crop
    for name, model in models.items():
        log.run(["embed-pca", str(first.slide), "--model", str(model), "--out", str(figs / f"pca_{name}.png"),
                 "--mpp", str(mpp), "--size", str(CROP_PX), "--x", str(first.x), "--y", str(first.y),
                 "--patch-size", str(PATCH)])
    truths = [load_truth(c.crop.slide) for c in crops]
    classes = truths[0].classes
    numbers = separation(crops, len(classes))
    shown = crops[:SHOWN]
    rgb = {}
    for name in models:  # one PCA per encoder over all crops shown (crops may differ in size)
        flat = np.concatenate([c.tokens[name].reshape(-1, c.tokens[name].shape[-1]) for c in shown])
        colours = patch_pca_rgb(flat[None], (1, len(flat)))[0, 0]
        ends = np.cumsum([c.labels.size for c in shown])
        rgb[name] = [part.reshape(*c.labels.shape, 3) for c, part in zip(shown, np.split(colours, ends[:-1]))]
    titles = {name: f"{name}: η² {numbers[name]['variance_share']:.2f}, kNN {numbers[name]['knn']:.2f}"
              for name in models}
    feature_map_figure(shown, rgb, [_truth_rgb(t, c.crop) for t, c in zip(truths, shown)], classes, titles,
                       figs / "feature_maps.png")
    result = {
        "numbers": numbers,
        "crops": [{"slide": c.crop.slide.name, "x": c.crop.x, "y": c.crop.y, "size_l0": c.crop.size_l0,
                   "classes": c.crop.n_classes, "tokens": int((c.labels >= 0).sum())} for c in crops],
        "mpp": mpp, "crop_px": CROP_PX, "tile_px": cfg.eval_size, "patch_size": PATCH,
        "n_classes": len(classes),
    }
    (figs / "feature_maps.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, v in numbers.items():
        print(f"feature maps, {name}: classes explain {100 * v['variance_share']:.0f}% of the patch-feature "
              f"variance; cross-slide kNN of patch features {v['knn']:.3f}")
    return result

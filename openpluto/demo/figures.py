"""The report's own figure, drawn large enough to read on the page: feature maps beside the
ground-truth class map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openpluto.io import atomic_path

FONT = 13  # points; figures are drawn at 100 dpi about as wide as the page shows them


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT + 1, "legend.fontsize": FONT - 1})
    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path


def feature_map_figure(crops, rgb: dict[str, list[np.ndarray]], truth_maps: list[np.ndarray],
                       classes: tuple[str, ...], titles: dict[str, str], path: str | Path) -> Path:
    """One row per crop: the image, its ground-truth classes, then each encoder's feature map.

    ``rgb[name][i]`` is crop ``i``'s map (float [h, w, 3] in 0..1), ``truth_maps[i]`` the uint8 RGB class
    map; ``titles[name]`` heads each encoder's column.
    """
    from matplotlib.patches import Patch

    from openpluto.demo.feature_maps import CLASS_COLOURS, NO_LABEL_COLOUR

    plt = _plt()
    n, cols = len(crops), 2 + len(rgb)
    fig, axes = plt.subplots(n, cols, figsize=(3.3 * cols, 3.3 * n + 1.2), squeeze=False)
    heads = ["image", "ground-truth classes", *titles.values()]
    for i, cf in enumerate(crops):
        s = cf.image.shape[0]
        panels = [cf.image, truth_maps[i], *(rgb[name][i] for name in rgb)]
        for j, (ax, img) in enumerate(zip(axes[i], panels)):
            ax.imshow(img, interpolation="nearest", extent=(0, s, s, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=FONT)
        axes[i, 0].set_ylabel(cf.crop.slide.stem, fontsize=FONT - 1)
    handles = [Patch(color=np.array(CLASS_COLOURS[k]) / 255, label=c) for k, c in enumerate(classes)]
    handles.append(Patch(color=np.array(NO_LABEL_COLOUR) / 255, label="background / artifact"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), frameon=False,
               fontsize=FONT - 1)
    fig.tight_layout(rect=(0, 0.9 / (3.3 * n + 1.2), 1, 1))
    return _save(fig, path)

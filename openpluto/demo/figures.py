"""The report's own figure, drawn large enough to read on the page: feature maps beside the
ground-truth class map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openpluto.io import atomic_path

FONT = 13  # points; drawn at 100 dpi about as wide as the page shows it


@dataclass
class MapRow:
    """One crop: its image and ground truth (both covering the crop), then RGB maps (``panels``).

    ``extent`` is where the maps lie in crop pixels (left, right, bottom, top): window-embedding maps
    cover the crop minus half a window at each edge.
    """

    label: str
    image: np.ndarray  # uint8 [S, S, 3]
    truth: np.ndarray  # uint8 RGB class map (any resolution, stretched over the crop)
    panels: list[np.ndarray]  # RGB [h, w, 3], uint8 or float in 0..1
    extent: tuple[float, float, float, float]


def feature_map_figure(rows: list[MapRow], titles: list[str], classes: tuple[str, ...],
                       path: str | Path) -> Path:
    """One row per crop: the image, its ground-truth classes, then the maps headed by ``titles``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from openpluto.demo.feature_maps import CLASS_COLOURS, NO_LABEL_COLOUR

    n, cols = len(rows), 2 + len(titles)
    height = 2.9 * n + 1.6
    fig, axes = plt.subplots(n, cols, figsize=(2.9 * cols, height), squeeze=False)
    heads = ["image", "ground truth", *titles]
    for i, row in enumerate(rows):
        s = row.image.shape[0]
        axes[i, 0].imshow(row.image, extent=(0, s, s, 0))
        axes[i, 1].imshow(row.truth, interpolation="nearest", extent=(0, s, s, 0))
        for ax, panel in zip(axes[i, 2:], row.panels):
            ax.imshow(panel, interpolation="nearest", extent=row.extent)
        for j, ax in enumerate(axes[i]):
            ax.set_xlim(0, s)
            ax.set_ylim(s, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=FONT)
        axes[i, 0].set_ylabel(row.label, fontsize=FONT)
    handles = [Patch(color=np.array(CLASS_COLOURS[k]) / 255, label=c) for k, c in enumerate(classes)]
    handles.append(Patch(color=np.array(NO_LABEL_COLOUR) / 255, label="background / artifact"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=FONT)
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path

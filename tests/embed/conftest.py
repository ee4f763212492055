"""Small synthetic slides and settings shared by the embed tests (kept tiny: 2 cores, <= 120 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _embed_utils import SLIDE_MPP, SLIDE_SIZE


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> list[Path]:
    """Three synthetic slides in one folder (different seeds; the truth .npz sits beside each)."""
    from openpluto.demo.synthetic import make_synthetic_slide

    root = tmp_path_factory.mktemp("cohort")
    paths = []
    for i in range(3):
        p = root / f"syn_{i}.tiff"
        make_synthetic_slide(p, size=SLIDE_SIZE, mpp=SLIDE_MPP, seed=100 + i, pen=i == 0, blur=False,
                             fold=False)
        paths.append(p)
    return paths

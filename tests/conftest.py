"""Shared fixtures: real data beside the checkout (skipped cleanly when absent), small synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("OPENPLUTO_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real slides in ``wsi/``, real H&E patches in ``patches/``)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    d = shared_data / "wsi"
    if not d.is_dir():
        pytest.skip(f"real slides not present at {d}")
    return d


@pytest.fixture(scope="session")
def patches_dir(shared_data: Path) -> Path:
    d = shared_data / "patches"
    if not d.is_dir():
        pytest.skip(f"real patches not present at {d}")
    return d


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def synth_slide(synth_dir: Path):
    """(path, truth) of a 2048 px synthetic slide at 0.5 µm/px with pen, blur and fold."""
    from openpluto.demo.synthetic import make_synthetic_slide

    path = synth_dir / "big" / "synth.tiff"
    truth = make_synthetic_slide(path, size=2048, mpp=0.5, seed=3)
    return path, truth


@pytest.fixture(scope="session")
def synth_cohort(synth_dir: Path) -> list[Path]:
    """Three small slides (1024 px; 0.25 and 0.5 µm/px) for pipeline tests."""
    from openpluto.demo.synthetic import make_synthetic_cohort

    return make_synthetic_cohort(synth_dir / "cohort", n_slides=3, seed=1, size=1024, mpp=(0.5, 0.25))


@pytest.fixture
def huge_header_tiff(tmp_path: Path) -> Path:
    """A 16 x 16 px tiled TIFF whose header claims 200,000 x 200,000 px (a corrupt size field)."""
    import numpy as np
    import tifffile

    path = tmp_path / "huge.tiff"
    tifffile.imwrite(path, np.full((16, 16, 3), 200, np.uint8), tile=(16, 16), photometric="rgb",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+b") as tf:
        tf.pages[0].tags["ImageWidth"].overwrite(200_000)
        tf.pages[0].tags["ImageLength"].overwrite(200_000)
    return path


def pytest_configure(config) -> None:
    """Keep torch (when a test imports it) to the 2 cores of CI without importing it here."""
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))


@pytest.fixture
def fresh_dynamo():
    """torch._dynamo with no compiled code and zeroed counters (``counters["stats"]["unique_graphs"]``)."""
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()

"""Shared synthetic slides for the slide tests (generated once per session, kept small)."""

from __future__ import annotations

from pathlib import Path

import pytest

from openpluto.slide.synthetic import make_synthetic_cohort, make_synthetic_slide


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def synth_slide(synth_dir: Path):
    """(path, truth) of a 2048 px synthetic slide at 0.5 µm/px with pen, blur and fold."""
    path = synth_dir / "big" / "synth.tiff"
    truth = make_synthetic_slide(path, size=2048, mpp=0.5, seed=3)
    return path, truth


@pytest.fixture(scope="session")
def synth_cohort(synth_dir: Path) -> list[Path]:
    """Three small slides (1024 px; 0.25 and 0.5 µm/px) for pipeline tests."""
    return make_synthetic_cohort(synth_dir / "cohort", n_slides=3, seed=1, size=1024, mpp=(0.5, 0.25))

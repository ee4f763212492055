"""Shared fixtures: the real data beside the checkout (skipped cleanly when absent)."""

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


def pytest_configure(config) -> None:
    """Keep torch (when a test imports it) to the 2 cores of CI without importing it here."""
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))

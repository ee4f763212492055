"""The demo's slides: the user's (``--slides``, checked before anything is written) or synthetic ones."""

from __future__ import annotations

import time
from pathlib import Path

from openpluto.demo.config import DemoConfig
from openpluto.errors import OpenPlutoError


def user_slides(folder: str | Path) -> list[Path]:
    """Slide files in ``folder``; a one-line error if it is missing or holds none."""
    from openpluto.jobs.slides import discover_slides

    src = Path(folder)
    if not src.is_dir():
        raise OpenPlutoError(f"--slides {src} is not a folder (give a folder of slide files)")
    found = discover_slides([src]).paths  # a folder without slides is a one-line InputError
    if not found:
        raise OpenPlutoError(f"--slides {src}: no usable slide files; leave --slides out for synthetic ones")
    return found


def demo_slides(cfg: DemoConfig, out: Path) -> tuple[Path, list[Path]]:
    """(folder, slide files): ``cfg.slides``, else ``cfg.n_slides`` synthetic slides in ``out/slides``."""
    if cfg.slides:
        print(f"using your slides in {cfg.slides}")
        return Path(cfg.slides), user_slides(cfg.slides)
    from openpluto.demo.synthetic import make_synthetic_cohort

    dst = out / "slides"
    t0 = time.time()
    paths = make_synthetic_cohort(dst, n_slides=cfg.n_slides, seed=cfg.seed, size=cfg.slide_size)
    print(f"{len(paths)} synthetic slides with ground truth in {dst} ({time.time() - t0:.1f} s)")
    return dst, paths

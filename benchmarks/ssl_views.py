"""Throughput of the SSL data side on CPU: the loader-worker half of the views (uint8 crops + drawn
augmentation parameters, one worker), the batched augmentation on the CPU, and iBOT mask sampling.

    python benchmarks/ssl_views.py [--tiles DIR] [--n 40] [--threads 1]

Tiles: PNG/JPEG/TIFF files under DIR (default: the real H&E patches in ../shared/data/patches) or
random 224 px images. Prints a markdown table; compare the worker images/s with the images/s a training
step consumes to choose ``data.num_workers`` (``benchmarks/pretrain_step.py`` measures both).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from openpluto.ssl import (
    BatchAugment,
    CropConfig,
    MaskConfig,
    MultiCropTransform,
    SSLConfig,
    collate_multicrop,
    sample_masks,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_tiles(folder: Path | None, n: int) -> list[Image.Image]:
    files: list[Path] = []
    if folder is not None and folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
    if files:
        return [Image.open(files[i % len(files)]).convert("RGB").resize((224, 224)) for i in range(n)]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


def bench_views(name: str, crops: CropConfig, tiles: list[Image.Image]) -> dict:
    tr = MultiCropTransform(crops)
    tr(tiles[0])
    t0 = time.perf_counter()
    batch = collate_multicrop([tr(t) for t in tiles])
    dt = time.perf_counter() - t0
    augment = BatchAugment(crops.augment, MEAN, STD)
    augment(batch, "cpu")
    t1 = time.perf_counter()
    augment(batch, "cpu")
    da = time.perf_counter() - t1
    views = f"{crops.n_global}x{crops.global_size} + {crops.n_local}x{crops.local_size}"
    return {"setting": name, "views": views, "images/s": len(tiles) / dt, "ms/image": 1000 * dt / len(tiles),
            "augment ms/image": 1000 * da / len(tiles)}


def bench_masks(n_images: int, grid: tuple[int, int], reps: int = 5) -> float:
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(reps):
        sample_masks(n_images, grid, MaskConfig(), g)
    return 1000 * (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "patches"
    ap.add_argument("--tiles", type=Path, default=default)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tiles = load_tiles(args.tiles, args.n)
    rows = [bench_views("cpu-tiny (default SSLConfig)", SSLConfig().crops, tiles),
            bench_views("DINOv2 / pluto4s", SSLConfig.dinov2_like(16).crops, tiles)]
    print(f"| setting | views | worker images/s (1 worker, {args.threads} thread) | worker ms/image | "
          "batched augmentation on CPU, ms/image |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['views']} | {r['images/s']:.1f} | {r['ms/image']:.1f} | "
              f"{r['augment ms/image']:.2f} |")
    print()
    print("| iBOT masks | ms per step |")
    print("|---|---|")
    for n_img, grid in ((32, (4, 4)), (64, (14, 14)), (64, (28, 28))):
        print(f"| {n_img} global crops, grid {grid[0]}x{grid[1]} | {bench_masks(n_img, grid):.1f} |")


if __name__ == "__main__":
    main()

"""Small generated inputs for the train tests: textured RGB tiles as PNG files or WebDataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_tiles(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """``n`` RGB tiles with random stripes/blobs (enough texture for crops to differ)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        f = rng.uniform(0.05, 0.5)
        phase = rng.uniform(0, 6.28)
        base = np.sin(f * (xx * np.cos(i) + yy * np.sin(i)) + phase)[..., None]
        col = rng.uniform(0.3, 1.0, size=3)
        img = 0.5 + 0.4 * base * col + 0.05 * rng.standard_normal((size, size, 3))
        out.append(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)))
    return out


def write_folder(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(make_tiles(n, size, seed)):
        sub = root / f"class{i % 2}"
        sub.mkdir(exist_ok=True)
        im.save(sub / f"{i:04d}.png")
    return root


def write_shards(root: Path, n: int, per_shard: int = 8, size: int = 64, seed: int = 0) -> Path:
    """WebDataset shards ``root/shards/part-XXXX.tar`` with ``jpg`` + ``json`` per sample."""
    d = root / "shards"
    d.mkdir(parents=True, exist_ok=True)
    tiles = make_tiles(n, size, seed)
    for s in range(0, n, per_shard):
        with tarfile.open(d / f"part-{s // per_shard:04d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, n)):
                buf = io.BytesIO()
                tiles[i].save(buf, format="JPEG", quality=90)
                meta = json.dumps({"slide": "synthetic", "x": i, "y": 0}).encode()
                for ext, data in (("jpg", buf.getvalue()), ("json", meta)):
                    info = tarfile.TarInfo(f"slide_{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root

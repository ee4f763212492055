"""Whole-slide embedding: plan tiles on the tissue mask, read them in workers, embed on the main process.

Per slide: ``open_slide`` -> ``detect_tissue`` -> ``grid_tiles`` at the target µm/px (the plan, made in
a background thread while the previous slide is still on the model) -> a DataLoader whose worker
processes read, decode and resize tiles (each with its own slide handle) while the model embeds the
previous batch under ``torch.inference_mode`` (bf16 autocast on GPU, fp32 on CPU) -> rows streamed
into ``.<slide>.*.h5.tmp``, renamed to ``<slide>.h5`` when complete. Memory is bounded by the batch
and prefetch depth, not by the slide size.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from openpluto import __version__
from openpluto.config import to_dict
from openpluto.embed.config import SLIDE_EXTENSIONS, EmbedConfig
from openpluto.embed.distributed import DistInfo, barrier, gather_objects, init_distributed, shard, shutdown
from openpluto.embed.slides import (  # noqa: F401 - the per-slide side, re-exported
    SlidePlan,
    TileEmbedder,
    Timings,
    embed_slides,
    plan_slide,
    read_level,
    slide_attrs,
)
from openpluto.embed.writer import clean_slide_temps, is_complete
from openpluto.errors import ConfigError, OpenPlutoError
from openpluto.io import atomic_path, write_json_atomic
from openpluto.slide.stream import StreamStats

# ----------------------------------------------------------------------------- inputs


def find_slides(inputs: list[str], recursive: bool = False) -> list[Path]:
    """Slide files named in ``inputs`` (files, or folders searched for slide extensions), sorted, unique."""
    if not inputs:
        raise ConfigError("no slides given (pass slide files or folders)")
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            files = [f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in SLIDE_EXTENSIONS
                     and not f.name.startswith(".")]
            if not files:
                raise ConfigError(f"no slides ({', '.join(SLIDE_EXTENSIONS)}) in folder {p}")
            found.extend(sorted(files))
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"slide or folder {p} does not exist")
    out, seen = [], set()
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def output_name(path: Path) -> str:
    """``<stem>`` of the output ``<stem>.h5`` for a slide file."""
    return path.stem


# ----------------------------------------------------------------------------- cohort


@dataclass
class EmbedSummary:
    slides: int = 0
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    tiles: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)  # main-process seconds per stage
    reader: StreamStats = field(default_factory=StreamStats)  # reader-process seconds per stage

    def merge(self, other: EmbedSummary) -> None:
        self.slides += other.slides
        self.embedded += other.embedded
        self.skipped += other.skipped
        self.failed += other.failed
        self.tiles += other.tiles
        self.seconds = max(self.seconds, other.seconds)
        self.errors.extend(other.errors)
        self.timings.add(other.timings)
        self.reader.add(other.reader)

    def line(self) -> str:
        rate = self.tiles / self.seconds if self.seconds > 0 else 0.0
        return (f"embedded {self.embedded} slide(s), {self.tiles} tiles in {self.seconds:.1f} s "
                f"({rate:.1f} tiles/s); skipped {self.skipped} already done; {self.failed} failed")


def one_line(exc: BaseException) -> str:
    """A one-line message for errors.csv (DataLoader worker errors carry a whole traceback)."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[-1] if lines else text
    if isinstance(exc, OpenPlutoError) and len(lines) > 1:  # "pkg.mod.SlideError: msg" from a worker
        head, _, rest = msg.partition(": ")
        if rest and head.rsplit(".", 1)[-1] == type(exc).__name__:
            msg = rest
    if not isinstance(exc, OpenPlutoError) and not msg.startswith(type(exc).__name__):
        msg = f"{type(exc).__name__}: {msg}"
    return msg


def settings_mismatch(path: Path, expected: dict[str, Any]) -> str:
    """``"mpp 0.5 != 1.0, ..."`` for attributes of a finished file that differ from this run ('' if none)."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    diffs = []
    for k, want in expected.items():
        have = attrs.get(k)
        have = have.decode() if isinstance(have, bytes) else have
        same = np.isclose(float(have), float(want)) if isinstance(want, float) and have is not None \
            else str(have) == str(want)
        if not same:
            diffs.append(f"{k} {have} != {want}")
    return ", ".join(diffs)


def write_errors_csv(path: Path, errors: list[tuple[str, str]]) -> None:
    """``slide,error`` rows (header only when every slide succeeded), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "error"])
        w.writerows(sorted(errors))


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' asked for but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{info.local_rank}")
    return dev


def load_model(cfg: EmbedConfig, device: torch.device) -> Any:
    from openpluto.model import load_encoder

    if not cfg.model:
        raise ConfigError("no model given: --model MODEL_DIR, timm:NAME:WEIGHTS or a preset name")
    torch.manual_seed(cfg.seed)  # random-init presets get the same weights in every run and rank
    return load_encoder(cfg.model, device=str(device))


def run_embed(cfg: EmbedConfig, progress: bool = True, log=print) -> EmbedSummary:
    """Embed every slide of ``cfg.inputs`` into ``cfg.out``; per-slide failures go to ``errors.csv``."""
    cfg.validate()
    if not cfg.out:
        raise ConfigError("no output folder given (--out DIR)")
    out_dir = Path(cfg.out)
    paths = find_slides(list(cfg.inputs), cfg.recursive)
    info = init_distributed("cuda" if cfg.device.startswith("cuda") or
                            (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _run(cfg, paths, out_dir, info, progress, log)
    finally:
        torch.set_num_threads(threads)
        shutdown(info)


def _run(cfg: EmbedConfig, paths: list[Path], out_dir: Path, info: DistInfo, progress: bool,
         log) -> EmbedSummary:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device, info)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    out_dir.mkdir(parents=True, exist_ok=True)

    encoder = load_model(cfg, device)
    patch_size = int(cfg.patch_size or encoder.default_patch_size)
    sizes = tuple(int(s) for s in getattr(encoder, "patch_sizes", (patch_size,)) or (patch_size,))
    if patch_size not in sizes:
        raise ConfigError(f"model {encoder.name} supports patch sizes {sizes}, not --patch-size {patch_size}")
    if cfg.tile_size % patch_size:
        raise ConfigError(f"--tile-size {cfg.tile_size} is not divisible by the patch size {patch_size}")
    if info.is_main:
        write_json_atomic(out_dir / "embed_config.json",
                          {**to_dict(cfg), "model_name": str(encoder.name),
                           "weights_hash": str(encoder.weights_hash), "patch_size": patch_size,
                           "compute_dtype": dtype, "openpluto_version": __version__,
                           "world_size": info.world_size})
    embedder = TileEmbedder(encoder, device, patch_size, cfg.pooling, dtype, tokens=cfg.save_patch_tokens)

    # Same output name from two folders would overwrite: the later ones are errors.
    summary = EmbedSummary(slides=0)
    owner: dict[str, Path] = {}
    unique: list[Path] = []
    for p in paths:
        name = output_name(p)
        if name in owner:
            if info.is_main:
                summary.errors.append((str(p), f"another slide ({owner[name]}) already writes {name}.h5; "
                                               "rename one of them"))
                summary.failed += 1
            continue
        owner[name] = p
        unique.append(p)
    if info.is_main:
        summary.slides += len(paths) - len(unique)

    expected = {"mpp": float(cfg.mpp), "tile_size": int(cfg.tile_size), "patch_size": patch_size,
                "pooling": cfg.pooling, "model": str(encoder.name), "weights_hash": str(encoder.weights_hash)}
    todo: list[Path] = []
    sizes = [p.stat().st_size for p in unique]  # balance ranks by file size (same split on every rank)
    for p in shard(unique, info.rank, info.world_size, weights=sizes):
        summary.slides += 1
        target = out_dir / f"{output_name(p)}.h5"
        clean_slide_temps(out_dir, output_name(p))
        if not cfg.overwrite and is_complete(target):
            differ = settings_mismatch(target, expected)
            if differ:
                summary.failed += 1
                summary.errors.append((str(p), f"{target} exists with other settings ({differ}); use "
                                               "--overwrite or another --out"))
            else:
                summary.skipped += 1
        else:
            todo.append(p)

    outer = tqdm(total=len(todo), desc=f"embed rank {info.rank}" if info.distributed else "embed",
                 unit="slide", position=0, disable=not progress, dynamic_ncols=True)
    jobs = [(p, out_dir / f"{output_name(p)}.h5") for p in todo]
    for res in embed_slides(jobs, cfg, embedder, patch_size, dtype, progress=progress,
                            timings=summary.timings, reader_stats=summary.reader):
        if res.error is None:
            summary.tiles += res.tiles
            summary.embedded += 1
        else:
            summary.failed += 1
            summary.errors.append((str(res.path), res.error))
            if progress:
                tqdm.write(f"failed: {res.path}: {res.error}", file=sys.stderr)
        outer.update(1)
    outer.close()
    summary.seconds = time.perf_counter() - t0

    parts = gather_objects(summary, info)
    total = EmbedSummary()
    for s in parts:
        total.merge(s)
    if info.is_main:
        write_errors_csv(out_dir / "errors.csv", total.errors)
        if log is not None:
            random = " [RANDOM-INIT model: baseline features]" if encoder.weights_hash == "random-init" \
                else ""
            log(total.line() + (f" -> {out_dir / 'errors.csv'}" if total.failed else "") + random)
    barrier(info)
    return total

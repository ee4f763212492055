"""Whole-slide embedding: plan tiles on the tissue mask, read them in workers, embed on the main process.

Per slide: ``open_slide`` -> ``detect_tissue`` -> ``grid_tiles`` at the target µm/px (the plan, made in
a background thread while the previous slide is still on the model) -> a DataLoader whose worker
processes read, decode and resize tiles (each with its own slide handle) while the model embeds the
previous batch under ``torch.inference_mode`` (bf16 autocast on GPU, fp32 on CPU) -> rows streamed
into ``.<slide>.*.h5.tmp``, renamed to ``<slide>.h5`` when complete. Memory is bounded by the batch
and prefetch depth, not by the slide size.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from openpluto import __version__
from openpluto.config import to_dict
from openpluto.embed.config import SLIDE_EXTENSIONS, EmbedConfig
from openpluto.embed.dataset import SlideTileDataset, tile_loader
from openpluto.embed.distributed import DistInfo, barrier, gather_objects, init_distributed, shard, shutdown
from openpluto.embed.writer import clean_slide_temps, is_complete, open_slide_h5
from openpluto.errors import ConfigError, OpenPlutoError
from openpluto.io import atomic_path, write_json_atomic

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


# ----------------------------------------------------------------------------- per-slide plan


@dataclass
class SlidePlan:
    """Where to embed on one slide: tile corners (level 0) and what the reader will do."""

    path: Path
    name: str
    coords: np.ndarray  # [N, 2] int64 level-0 x, y
    tissue_fraction: np.ndarray  # [N] float32
    slide_mpp: float  # level-0 µm/px
    level: int  # pyramid level the reader uses for the target mpp
    level_downsample: float
    tile_size_level0: int
    mpp_override: float | None
    thumbnail: np.ndarray = field(repr=False)  # RGB uint8
    thumbnail_downsample: float  # level-0 px per thumbnail px
    total_tiles: int = 0  # before --max-tiles


def read_level(slide: Any, mpp: float) -> tuple[int, float]:
    """(level, downsample) that ``Slide.read`` uses for ``mpp``: the coarsest level at least as fine."""
    level = slide.level_for_mpp(mpp, allow_upsample=True)
    return level, float(slide.level_downsamples[level])


def plan_slide(path: Path, cfg: EmbedConfig) -> SlidePlan:
    """Open the slide, find usable tissue and lay the tile grid; reads one tile to fail early."""
    from openpluto.slide import detect_tissue, grid_tiles, open_slide, resolve_mpp

    override = resolve_mpp(path, cfg.mpp_override) if cfg.mpp_override else None
    with open_slide(path, mpp_override=override) as slide:
        if not slide.mpp or slide.mpp <= 0:
            raise OpenPlutoError(f"{path}: no µm/px in the slide metadata; give --mpp-override VALUE or "
                                 "a CSV slide,mpp")
        # Refuse upsampling (or a bad mpp) before the costly tissue detection.
        slide.level_for_mpp(cfg.mpp, allow_upsample=cfg.allow_upsample)
        result = detect_tissue(slide)
        grid = np.asarray(grid_tiles(slide, result, cfg.mpp, cfg.tile_size, min_tissue=cfg.min_tissue))
        grid = grid.reshape(-1, 3)
        coords = np.rint(grid[:, :2]).astype(np.int64)
        frac = grid[:, 2].astype(np.float32)
        total = len(coords)
        if total == 0:
            raise OpenPlutoError(f"{path}: no tile of {cfg.tile_size} px at {cfg.mpp} µm/px has >= "
                                 f"{cfg.min_tissue:.0%} usable tissue (lower --min-tissue or check the mask "
                                 "with `openpluto tissue`)")
        if cfg.max_tiles is not None and total > cfg.max_tiles:
            keep = np.unique(np.linspace(0, total - 1, cfg.max_tiles).round().astype(np.int64))
            coords, frac = coords[keep], frac[keep]
        # Fail here, on the main process, with the reader's one-line message (e.g. refusal to upsample).
        slide.read(int(coords[0, 0]), int(coords[0, 1]), cfg.tile_size, cfg.mpp,
                   allow_upsample=cfg.allow_upsample)
        level, level_ds = read_level(slide, cfg.mpp)
        return SlidePlan(
            path=path, name=output_name(path), coords=coords, tissue_fraction=frac,
            slide_mpp=float(slide.mpp), level=level, level_downsample=level_ds,
            tile_size_level0=int(round(cfg.tile_size * cfg.mpp / slide.mpp)), mpp_override=override,
            thumbnail=np.asarray(result.thumbnail), thumbnail_downsample=float(result.downsample),
            total_tiles=total)


# ----------------------------------------------------------------------------- model side


class TileEmbedder:
    """uint8 RGB tiles [B, 3, T, T] -> tile embeddings [B, D] (and patch tokens [B, h*w, D]) on ``device``.

    Normalises with the encoder's mean/std (0..1 RGB), runs under ``torch.inference_mode`` and, for
    ``dtype="bf16"``, autocast; outputs are float32 on the CPU.
    """

    def __init__(self, encoder: Any, device: torch.device, patch_size: int | None, pooling: str,
                 dtype: str = "fp32", tokens: bool = False):
        self.encoder = encoder
        self.device = device
        self.patch_size = patch_size
        self.pooling = pooling
        self.tokens = tokens
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        self.mean = torch.tensor(encoder.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(encoder.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.grid: tuple[int, int] | None = None

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True).float().div_(255.0)
        return (x - self.mean) / self.std

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        x = self.normalise(batch)
        with self._autocast():
            if not self.tokens:
                feats = self.encoder.embed(x, patch_size=self.patch_size, pooling=self.pooling)
                return feats.float().cpu().numpy(), None
            out = self.encoder.forward_features(x, patch_size=self.patch_size)
        cls, patch = out["cls"].float(), out["patch"].float()
        self.grid = tuple(int(g) for g in out["grid"])
        feats = cls if self.pooling == "cls" else torch.cat([cls, patch.mean(dim=1)], dim=1)
        return feats.cpu().numpy(), patch.to(torch.float16).cpu().numpy()


# ----------------------------------------------------------------------------- one slide


def slide_attrs(plan: SlidePlan, cfg: EmbedConfig, encoder: Any, patch_size: int, feature_dim: int,
                dtype: str) -> dict[str, Any]:
    return {
        "mpp": float(cfg.mpp), "magnification": round(10.0 / cfg.mpp, 3), "tile_size": int(cfg.tile_size),
        "tile_size_level0": int(plan.tile_size_level0), "patch_size": int(patch_size),
        "pooling": cfg.pooling, "model": str(encoder.name), "weights_hash": str(encoder.weights_hash),
        "openpluto_version": __version__, "slide_path": str(plan.path), "slide_name": plan.name,
        "slide_mpp": float(plan.slide_mpp),
        "mpp_override": -1.0 if plan.mpp_override is None else float(plan.mpp_override),
        "level": int(plan.level), "level_downsample": float(plan.level_downsample),
        "embed_dim": int(feature_dim), "num_tiles": len(plan.coords),
        "num_tissue_tiles": int(plan.total_tiles),
        "min_tissue": float(cfg.min_tissue), "dtype": dtype,
    }


def embed_slide(plan: SlidePlan, embedder: TileEmbedder, cfg: EmbedConfig, out_path: Path, patch_size: int,
                dtype: str, progress: bool = True, position: int = 1,
                on_loading: Callable[[], None] | None = None) -> int:
    """Embed every planned tile of one slide into ``out_path`` (atomic); returns the number of tiles.

    ``on_loading`` is called once the loader's worker processes are running (used to plan the next
    slide meanwhile).
    """
    encoder = embedder.encoder
    feature_dim = int(encoder.embed_dim_for(cfg.pooling))
    ds = SlideTileDataset(plan.path, plan.coords, cfg.mpp, cfg.tile_size, mpp_override=plan.mpp_override,
                          allow_upsample=cfg.allow_upsample)
    loader = tile_loader(ds, cfg.batch_size, cfg.workers, pin_memory=embedder.device.type == "cuda")
    token_shape = token_grid = None
    if cfg.save_patch_tokens:
        gh = gw = cfg.tile_size // patch_size
        token_shape, token_grid = (gh * gw, int(encoder.embed_dim_for("cls"))), (gh, gw)
    attrs = slide_attrs(plan, cfg, encoder, patch_size, feature_dim, dtype)
    bar = tqdm(total=len(plan.coords), desc=plan.name[:24], unit="tile", leave=False, position=position,
               disable=not progress, dynamic_ncols=True)
    batches = None
    try:
        batches = iter(loader)  # forks the workers before the h5 file is open
        if on_loading is not None:
            on_loading()
        with open_slide_h5(out_path, plan.coords, feature_dim, attrs, tissue_fraction=plan.tissue_fraction,
                           token_shape=token_shape, token_grid=token_grid) as w:
            for batch in batches:
                feats, tokens = embedder(batch)
                w.append(feats, tokens)
                bar.update(len(batch))
            if cfg.pictures:
                try:
                    from openpluto.embed.pictures import feature_pc1, save_pc1_heatmap

                    values = feature_pc1(w.iter_features)
                    png = out_path.parent / "pictures" / f"{plan.name}_pc1.png"
                    save_pc1_heatmap(png, plan.thumbnail, plan.thumbnail_downsample, plan.coords,
                                     plan.tile_size_level0, values,
                                     title=f"{plan.name}: PC1 of tile features")
                except Exception as e:  # noqa: BLE001 - a picture must never cost the features
                    tqdm.write(f"warning: {plan.name}: no PC1 picture ({one_line(e)})", file=sys.stderr)
    finally:
        bar.close()
        del batches, loader  # shuts the workers down
    return len(plan.coords)


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

    def merge(self, other: EmbedSummary) -> None:
        self.slides += other.slides
        self.embedded += other.embedded
        self.skipped += other.skipped
        self.failed += other.failed
        self.tiles += other.tiles
        self.seconds = max(self.seconds, other.seconds)
        self.errors.extend(other.errors)

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


class _Planner:
    """Plans the next slide in a background thread while the current one is on the model.

    The thread is started only after the current slide's DataLoader has forked its workers and is
    joined before the next fork, so no fork ever happens while it is inside OpenSlide or numpy.
    """

    def __init__(self, cfg: EmbedConfig):
        self.cfg = cfg
        self._thread: threading.Thread | None = None
        self._result: tuple[SlidePlan | None, BaseException | None] = (None, None)

    def start(self, path: Path) -> None:
        def work() -> None:
            try:
                self._result = (plan_slide(path, self.cfg), None)
            except Exception as e:  # noqa: BLE001 - reported per slide
                self._result = (None, e)

        self._thread = threading.Thread(target=work, name="openpluto-plan", daemon=True)
        self._thread.start()

    def get(self) -> tuple[SlidePlan | None, BaseException | None]:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        out, self._result = self._result, (None, None)
        return out


def load_model(cfg: EmbedConfig, device: torch.device) -> Any:
    from openpluto.model import load_encoder, maybe_compile

    if not cfg.model:
        raise ConfigError("no model given: --model MODEL_DIR, timm:NAME:WEIGHTS or a preset name")
    torch.manual_seed(cfg.seed)  # random-init presets get the same weights in every run and rank
    return maybe_compile(load_encoder(cfg.model, device=str(device)), cfg.compile)


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
    planner = _Planner(cfg)
    if todo:
        planner.start(todo[0])
    for i, path in enumerate(todo):
        plan, err = planner.get()
        started = False

        def start_next(i: int = i) -> None:
            nonlocal started
            if not started and i + 1 < len(todo):
                planner.start(todo[i + 1])
            started = True

        try:
            if err is not None:
                raise err
            assert plan is not None
            summary.tiles += embed_slide(plan, embedder, cfg, out_dir / f"{plan.name}.h5", patch_size, dtype,
                                         progress=progress, on_loading=start_next)
            summary.embedded += 1
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the cohort
            summary.failed += 1
            summary.errors.append((str(path), one_line(e)))
            if progress:
                tqdm.write(f"failed: {path}: {one_line(e)}", file=sys.stderr)
        finally:
            del plan
        start_next()
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

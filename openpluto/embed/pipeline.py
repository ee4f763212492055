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
from openpluto.distributed import DistInfo, barrier, cleanup_distributed, gather_objects, init_distributed
from openpluto.embed.cohort import EmbedSummary, record_attrs, select_slides, todo_slides, write_parts
from openpluto.embed.config import EmbedConfig
from openpluto.embed.dataset import SlideTileDataset, tile_loader
from openpluto.embed.writer import clean_slide_temps, open_slide_h5
from openpluto.errors import ConfigError, OpenPlutoError
from openpluto.io import write_json_atomic

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
    record: dict = field(default_factory=dict)  # slide id, identity, settings (see embed.cohort.record_attrs)


def read_level(slide: Any, mpp: float) -> tuple[int, float]:
    """(level, downsample) that ``Slide.read`` uses for ``mpp``: the coarsest level at least as fine."""
    level = slide.level_for_mpp(mpp, allow_upsample=True)
    return level, float(slide.level_downsamples[level])


def plan_slide(path: Path, cfg: EmbedConfig, slide_id: str | None = None,
               mpp_override: float | None = None) -> SlidePlan:
    """Open the slide, find usable tissue and lay the tile grid; reads one tile to fail early.

    ``slide_id`` names the output (default: the readable file stem); ``mpp_override`` is this slide's
    µm/px override (default: looked up in ``cfg.mpp_override``).
    """
    from openpluto.jobs.slides import readable_stem
    from openpluto.slide import detect_tissue, grid_tiles, open_slide, resolve_mpp

    path = Path(path)
    override = mpp_override if mpp_override is not None else resolve_mpp(path, cfg.mpp_override)
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
            path=path, name=slide_id or readable_stem(path), coords=coords, tissue_fraction=frac,
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
        "min_tissue": float(cfg.min_tissue), "dtype": dtype, **plan.record,
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


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' asked for but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{info.local_rank}")
    return dev


class PlanError(OpenPlutoError):
    """Planning one slide failed, timed out (``kind="timeout"``) or crashed; the message is one line."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind


def plan_isolated(path: Path, cfg: EmbedConfig, slide_id: str, mpp_override: float | None) -> SlidePlan:
    """``plan_slide`` in its own process with ``cfg.timeout``: a reader that hangs (a corrupt header,
    a huge level read) or crashes costs that slide only, never the run. The model stays in this process."""
    from openpluto.jobs.isolate import run_isolated

    (o,) = run_isolated(plan_slide, [(slide_id, (path, cfg, slide_id, mpp_override))], workers=1,
                        timeout=cfg.timeout, start_method="forkserver")
    if not o.ok:
        raise PlanError(o.error, o.kind)
    return o.value


class _Planner:
    """Plans the next slide in a background thread while the current one is on the model.

    The plan itself runs in a process started by a fork server (``plan_isolated``), so this thread
    never forks the model process; the thread is started only after the current slide's DataLoader
    has forked its workers and is joined before the next fork.
    """

    def __init__(self, cfg: EmbedConfig):
        import multiprocessing

        multiprocessing.set_forkserver_preload(["openpluto.embed.pipeline"])
        self.cfg = cfg
        self._thread: threading.Thread | None = None
        self._result: tuple[SlidePlan | None, BaseException | None] = (None, None)

    def start(self, path: Path, slide_id: str, mpp_override: float | None, record: dict) -> None:
        def work() -> None:
            try:
                plan = plan_isolated(path, self.cfg, slide_id, mpp_override)
                plan.record = record
                self._result = (plan, None)
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
    """Embed this process's share of ``cfg.inputs`` into ``cfg.out``; per-slide failures go to ``errors.csv``.

    Inputs, the model and earlier outputs are checked before anything is written, so a failed start
    leaves no ``out`` folder behind.
    """
    from openpluto.slide.mpp import MppOverrides

    cfg.validate()
    if not cfg.out:
        raise ConfigError("no output folder given (--out DIR)")
    out_dir = Path(cfg.out)
    overrides = MppOverrides.parse(cfg.mpp_override)
    cohort = select_slides(cfg, out_dir)
    info = init_distributed(use_cuda=cfg.device.startswith("cuda") or
                            (cfg.device == "auto" and torch.cuda.is_available()))
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _run(cfg, cohort, overrides, out_dir, info, progress, log)
    finally:
        torch.set_num_threads(threads)
        cleanup_distributed(info)


def _load_checked(cfg: EmbedConfig, device: torch.device) -> tuple[Any, int]:
    """(encoder, patch size) after checking the patch size fits the model and the tile."""
    encoder = load_model(cfg, device)
    patch_size = int(cfg.patch_size or encoder.default_patch_size)
    sizes = tuple(int(s) for s in getattr(encoder, "patch_sizes", (patch_size,)) or (patch_size,))
    if patch_size not in sizes:
        raise ConfigError(f"model {encoder.name} supports patch sizes {sizes}, not --patch-size {patch_size}")
    if cfg.tile_size % patch_size:
        raise ConfigError(f"--tile-size {cfg.tile_size} is not divisible by the patch size {patch_size}")
    return encoder, patch_size


def _run(cfg: EmbedConfig, cohort: Any, overrides: Any, out_dir: Path, info: DistInfo, progress: bool,
         log) -> EmbedSummary:
    from openpluto.jobs.outputs import error_row, slide_message
    from openpluto.jobs.runner import stderr_writer
    from openpluto.jobs.slides import report_skipped

    t0 = time.perf_counter()
    device = resolve_device(cfg.device, info)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    encoder, patch_size = _load_checked(cfg, device)
    todo = todo_slides(cohort, cfg, out_dir, encoder, patch_size, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        write_json_atomic(out_dir / "embed_config.json",
                          {**to_dict(cfg), "model_name": str(encoder.name),
                           "weights_hash": str(encoder.weights_hash), "patch_size": patch_size,
                           "compute_dtype": dtype, "openpluto_version": __version__,
                           "world_size": info.world_size})
    embedder = TileEmbedder(encoder, device, patch_size, cfg.pooling, dtype, tokens=cfg.save_patch_tokens)
    say = stderr_writer(progress)
    report_skipped(cohort.skipped, say)
    for n in todo.notes:
        say(n)
    summary = EmbedSummary(slides=len(cohort.mine) + cohort.skipped_failures, skipped=len(todo.already),
                           failed=cohort.skipped_failures, errors=cohort.skipped_rows("embed"))
    jobs = todo.slides
    for ref, _, _ in jobs:
        clean_slide_temps(out_dir, ref.id)

    outer = tqdm(total=len(jobs), desc=f"embed rank {info.rank}" if info.distributed else "embed",
                 unit="slide", position=0, disable=not progress, dynamic_ncols=True)
    planner = _Planner(cfg)

    def start(k: int) -> None:
        ref, identity, settings = jobs[k]
        planner.start(ref.path, ref.id, settings["mpp_override"], record_attrs(ref.id, identity, settings))

    if jobs:
        start(0)
    for i, (ref, _, _) in enumerate(jobs):
        plan, err = planner.get()
        started = False

        def start_next(i: int = i) -> None:
            nonlocal started
            if not started and i + 1 < len(jobs):
                start(i + 1)
            started = True

        try:
            if err is not None:
                raise err
            assert plan is not None
            summary.tiles += embed_slide(plan, embedder, cfg, out_dir / f"{ref.id}.h5", patch_size, dtype,
                                         progress=progress, on_loading=start_next)
            summary.embedded += 1
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one bad slide must not stop the cohort
            line = slide_message(ref.path, one_line(e))
            summary.failed += 1
            summary.errors.append(error_row(ref.id, ref.path, "embed", getattr(e, "kind", "error"), line))
            say(f"error: {line}")
        finally:
            del plan
        start_next()
        outer.update(1)
    outer.close()
    summary.seconds = time.perf_counter() - t0
    write_parts(out_dir, cohort.shard, summary)

    total = EmbedSummary()
    for s in gather_objects(summary, info):
        total.merge(s)
    if info.is_main and log is not None:
        random = " [RANDOM-INIT model: baseline features]" if encoder.weights_hash == "random-init" else ""
        errors = " -> errors.csv" if total.failed else ""
        log(total.line() + errors + random)
    barrier(info)
    return total

"""The per-slide side of ``openpluto embed``: plan, read, embed and write a list of slides, streamed.

``embed_slides(todo, cfg, embedder, ...)`` starts ONE pool of reader processes
(``openpluto.slide.stream.TileStream``) for the whole list. Slides stream through it: a worker plans
a slide (``plan_slide``: tissue mask, tile grid at the target µm/px, tiles in blocks of 8 x 8 grid
cells) while others read the blocks of the slide before it (raw JPEG + DCT scaling where possible,
see ``openpluto.slide.fastread``) into shared memory; the main process packs tiles into batches
(pinned host buffers on CUDA), sends uint8 to the device (non-blocking), normalises there, embeds
under ``torch.inference_mode`` (bf16 autocast on GPU) and streams rows into ``.<slide>.*.h5.tmp``,
renamed to ``<slide>.h5`` when complete. A slide whose reads fail, hang (``cfg.timeout``) or crash
its reader fails alone; the model never leaves the main process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openpluto import __version__
from openpluto.embed.config import EmbedConfig
from openpluto.embed.embedder import BatchPacker, PendingEmbedding, TileEmbedder, Timings
from openpluto.embed.writer import open_slide_h5
from openpluto.errors import OpenPlutoError
from openpluto.progress import progress as progress_bar
from openpluto.progress import write

# ----------------------------------------------------------------------------- per-slide plan


@dataclass
class SlidePlan:
    """Where to embed on one slide: tile corners (level 0) and what the reader will do."""

    path: Path
    name: str
    coords: np.ndarray  # [N, 2] int64 level-0 x, y, in blocks of 8 x 8 grid cells (row-major inside)
    tissue_fraction: np.ndarray  # [N] float32
    slide_mpp: float  # level-0 µm/px
    level: int  # pyramid level OpenSlide would read for the target mpp
    level_downsample: float
    tile_size_level0: int
    mpp_override: float | None
    thumbnail: np.ndarray | None = field(repr=False)  # RGB uint8 (None in plans made by reader processes)
    thumbnail_downsample: float  # level-0 px per thumbnail px
    total_tiles: int = 0  # before --max-tiles
    record: dict = field(default_factory=dict)  # slide id, identity, settings (see embed.cohort.record_attrs)


def read_level(slide: Any, mpp: float) -> tuple[int, float]:
    """(level, downsample) that ``Slide.read`` uses for ``mpp``: the coarsest level at least as fine."""
    level = slide.level_for_mpp(mpp, allow_upsample=True)
    return level, float(slide.level_downsamples[level])


def plan_slide(path: Path, cfg: EmbedConfig, slide_id: str | None = None,
               mpp_override: float | None = None) -> SlidePlan:
    """Open the slide, find usable tissue and lay the tile grid (in blocks for the reader); reads one
    tile to fail early.

    ``slide_id`` names the output (default: the readable file stem); ``mpp_override`` is this slide's
    µm/px override (default: looked up in ``cfg.mpp_override``).
    """
    from openpluto.jobs.slides import readable_stem
    from openpluto.slide import detect_tissue, grid_tiles, open_slide, resolve_mpp
    from openpluto.slide.fastread import block_order

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
        order = block_order(coords, cfg.tile_size * cfg.mpp / slide.mpp)
        coords, frac = coords[order], frac[order]
        # Fail here with the reader's one-line message (e.g. refusal to upsample).
        slide.read(int(coords[0, 0]), int(coords[0, 1]), cfg.tile_size, cfg.mpp,
                   allow_upsample=cfg.allow_upsample)
        level, level_ds = read_level(slide, cfg.mpp)
        return SlidePlan(
            path=path, name=slide_id or readable_stem(path), coords=coords, tissue_fraction=frac,
            slide_mpp=float(slide.mpp), level=level, level_downsample=level_ds,
            tile_size_level0=int(round(cfg.tile_size * cfg.mpp / slide.mpp)), mpp_override=override,
            thumbnail=np.asarray(result.thumbnail), thumbnail_downsample=float(result.downsample),
            total_tiles=total)


def plan_job(job) -> SlidePlan:
    """``plan_slide`` for a ``TileStream`` job (runs in a reader process; ``job.context`` is the config).

    The thumbnail stays behind (the picture job reads it again), so the answer is small.
    """
    plan = plan_slide(Path(job.path), job.context, slide_id=job.key, mpp_override=job.mpp_override)
    return dataclasses.replace(plan, thumbnail=None)


# ----------------------------------------------------------------------------- outputs


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


class SlideOutput:
    """The h5 file of the slide being embedded: a temp file until ``finish``; ``abort`` removes it."""

    def __init__(self, plan: SlidePlan, out_path: Path, cfg: EmbedConfig, encoder: Any, patch_size: int,
                 dtype: str):
        self.plan, self.out_path, self.cfg = plan, out_path, cfg
        feature_dim = int(encoder.embed_dim_for(cfg.pooling))
        token_shape = token_grid = None
        if cfg.save_patch_tokens:
            gh = gw = cfg.tile_size // patch_size
            token_shape, token_grid = (gh * gw, int(encoder.embed_dim_for("cls"))), (gh, gw)
        attrs = slide_attrs(plan, cfg, encoder, patch_size, feature_dim, dtype)
        self._stack = contextlib.ExitStack()
        self.writer = self._stack.enter_context(open_slide_h5(
            out_path, plan.coords, feature_dim, attrs, tissue_fraction=plan.tissue_fraction,
            token_shape=token_shape, token_grid=token_grid))

    def finish(self) -> int:
        """The complete file renamed into place; returns the number of tiles."""
        self._stack.close()
        return len(self.plan.coords)

    def picture_args(self) -> tuple:
        """Arguments of ``pc1_picture`` for this (finished) slide."""
        plan = self.plan
        png = self.out_path.parent / "pictures" / f"{plan.name}_pc1.png"
        return (str(self.out_path), str(png), str(plan.path), plan.mpp_override, plan.thumbnail_downsample,
                plan.tile_size_level0, f"{plan.name}: PC1 of tile features")

    def abort(self, error: BaseException) -> None:
        """Drop the temp file (the slide failed)."""
        self._stack.__exit__(type(error), error, error.__traceback__)


def pc1_picture(h5_path: str, png_path: str, slide_path: str, mpp_override: float | None,
                thumbnail_downsample: float, tile_size_level0: int, title: str) -> None:
    """``pictures/<slide>_pc1.png`` from a finished slide file (run in a reader process: PCA + PNG).

    The thumbnail is the tissue mask's (same downsample, so the same pixels), read again here.
    """
    import h5py

    from openpluto.embed.pictures import feature_pc1, iter_rows, save_pc1_heatmap
    from openpluto.slide import open_slide

    with open_slide(slide_path, mpp_override=mpp_override, require_mpp=False) as slide:
        thumbnail, thumbnail_downsample = slide.thumbnail(downsample=thumbnail_downsample)
    with h5py.File(h5_path, "r") as f:
        values = feature_pc1(iter_rows(f["features"]))
        coords = f["coords"][()]
    save_pc1_heatmap(png_path, thumbnail, thumbnail_downsample, coords, tile_size_level0, values, title=title)


# ----------------------------------------------------------------------------- the stream


@dataclass
class SlideTodo:
    """A slide for ``embed_slides``: its file, id, output ``.h5``, µm/px override and h5 record attributes."""

    path: Path
    slide_id: str
    out_path: Path
    mpp_override: float | None = None
    record: dict = field(default_factory=dict)


@dataclass
class SlideResult:
    """Outcome of one slide of ``embed_slides``: ``tiles`` embedded, or ``error`` (one line)."""

    path: Path
    slide_id: str
    out_path: Path
    tiles: int = 0
    error: str | None = None
    kind: str = ""  # "", "error", "timeout", "crash"


def _reader_jobs(todo: list[SlideTodo], cfg: EmbedConfig) -> list:
    from openpluto.slide.stream import ReadJob

    context = dataclasses.replace(cfg, inputs=[])  # sent with every job: keep it small
    return [ReadJob(key=t.slide_id, path=str(t.path), mpp=cfg.mpp, tile_size=cfg.tile_size,
                    mpp_override=t.mpp_override, allow_upsample=cfg.allow_upsample, context=context)
            for t in todo]


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


def embed_slides(todo: list[SlideTodo], cfg: EmbedConfig, embedder: TileEmbedder, patch_size: int,
                 dtype: str, progress: bool = True, timings: Timings | None = None,
                 reader_stats: Any = None) -> Iterator[SlideResult]:
    """Embed each slide of ``todo`` with one pool of reader processes for them all (``cfg.workers``,
    at least 1); yield each slide's ``SlideResult`` in order. A slide that fails (bad file, reader
    error, hang past ``cfg.timeout``, crashed reader, model error) leaves no output; the others go on.

    ``timings`` (main-process stages) and ``reader_stats`` (a ``StreamStats``, worker side) are
    added to when given.
    """
    from openpluto.slide.stream import SlideDone, SlideFailed, SlidePlanned, SlideTiles, TileStream

    if not todo:
        return
    timings = timings if timings is not None else Timings()
    jobs = _reader_jobs(todo, cfg)
    where = {job.key: t for job, t in zip(jobs, todo)}
    pin = embedder.device.type == "cuda"
    packer = BatchPacker(cfg.batch_size, cfg.tile_size, pin)
    stream = TileStream(plan_job, cfg.tile_size, workers=max(1, cfg.workers), timeout=cfg.timeout,
                        tiles_per_read=min(64, max(16, cfg.batch_size)),
                        options={"backend": cfg.reader, "dct_scaling": cfg.dct_scaling})
    output: SlideOutput | None = None
    inflight: deque[tuple[PendingEmbedding, int]] = deque()
    skip: str | None = None  # key of a slide that failed on the model side: ignore its remaining events
    bar = None

    def drain(keep: int) -> None:
        while len(inflight) > keep:
            pending, n = inflight.popleft()
            t0 = time.perf_counter()
            feats, tokens = pending.result()
            t1 = time.perf_counter()
            assert output is not None
            output.writer.append(feats, tokens)
            timings.write += time.perf_counter() - t1
            timings.wait += t1 - t0  # waiting for the device is not the readers' fault, but it is idle time
            if bar is not None:
                bar.update(n)

    def submit(batch: torch.Tensor) -> None:
        inflight.append((embedder.submit(batch), len(batch)))
        drain(keep=1)

    events = stream.stream(jobs)
    try:
        with stream:
            while True:
                t0 = time.perf_counter()
                ev = next(events, None)
                timings.wait += time.perf_counter() - t0
                if ev is None:
                    break
                key = ev.job.key
                item = where[key]
                path, out_path = item.path, item.out_path
                if key == skip and not isinstance(ev, SlideDone | SlideFailed):
                    continue
                try:
                    if isinstance(ev, SlidePlanned):
                        ev.plan.record = item.record
                        output = SlideOutput(ev.plan, out_path, cfg, embedder.encoder, patch_size, dtype)
                        bar = progress_bar(total=len(ev.plan.coords), desc=ev.plan.name[:24], unit="tile",
                                         leave=False, position=1, disable=not progress, dynamic_ncols=True)
                    elif isinstance(ev, SlideTiles):
                        t0 = time.perf_counter()
                        for batch in packer.add(ev.tiles):
                            timings.pack += time.perf_counter() - t0
                            submit(batch)
                            t0 = time.perf_counter()
                        timings.pack += time.perf_counter() - t0
                        timings.tiles += len(ev.tiles)
                    elif isinstance(ev, SlideDone):
                        if key == skip:
                            skip = None
                            continue
                        last = packer.flush()
                        if last is not None:
                            submit(last)
                        drain(keep=0)
                        t0 = time.perf_counter()
                        assert output is not None
                        n = output.finish()
                        if cfg.pictures:
                            stream.post(pc1_picture, *output.picture_args())
                        output = None
                        timings.write += time.perf_counter() - t0
                        if reader_stats is not None:
                            reader_stats.add(ev.stats)
                        yield SlideResult(path, key, out_path, tiles=n)
                    else:  # SlideFailed
                        if key == skip:
                            skip = None
                            continue
                        inflight.clear()
                        packer.reset()
                        if output is not None:
                            output.abort(OpenPlutoError(ev.error))
                            output = None
                        yield SlideResult(path, key, out_path, error=ev.error, kind=ev.kind)
                except (KeyboardInterrupt, GeneratorExit):
                    raise
                except Exception as e:  # noqa: BLE001 - the model or the writer failed on this slide
                    inflight.clear()
                    packer.reset()
                    if output is not None:
                        output.abort(e)
                        output = None
                    if not isinstance(ev, SlideDone | SlideFailed):
                        skip = key
                    yield SlideResult(path, key, out_path, error=one_line(e), kind="error")
                finally:
                    if bar is not None and (output is None):
                        bar.close()
                        bar = None
    finally:
        if output is not None:
            output.abort(KeyboardInterrupt())
        if bar is not None:
            bar.close()
        embedder.clock.settle(timings)
    for err in stream.side_errors:  # a picture must never cost the features: a warning only
        write(f"warning: no PC1 picture: {err}")

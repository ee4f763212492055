"""Whole-slide embedding, the cohort side: which slides, the model, errors and summaries.

``run_embed`` picks this process's slides (``embed.cohort``), loads the encoder once and hands the
slides still to do to ``embed.slides.embed_slides``: one pool of reader processes for the whole run
(plans, tiles and pictures; a slide whose reader fails, hangs or crashes fails alone), the model in
this process, one ``<slide id>.h5`` per slide written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from openpluto import __version__
from openpluto.config import to_dict
from openpluto.distributed import DistInfo, barrier, cleanup_distributed, gather_objects, init_distributed
from openpluto.embed.cohort import EmbedSummary, record_attrs, select_slides, todo_slides, write_parts
from openpluto.embed.config import EmbedConfig
from openpluto.embed.embedder import TileEmbedder
from openpluto.embed.slides import SlideTodo, embed_slides
from openpluto.embed.writer import clean_slide_temps
from openpluto.errors import ConfigError
from openpluto.io import write_json_atomic
from openpluto.jobs.outputs import part_name
from openpluto.progress import progress as progress_bar

# ----------------------------------------------------------------------------- cohort


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
        summary = _run(cfg, cohort, overrides, out_dir, info, progress, log)
    except BaseException:
        cleanup_distributed(info, graceful=False)  # peers may be stuck elsewhere: no barrier
        raise
    finally:
        torch.set_num_threads(threads)
    cleanup_distributed(info)
    return summary


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

    outer = progress_bar(total=len(jobs), desc=f"embed rank {info.rank}" if info.distributed else "embed",
                         unit="slide", position=0, disable=not progress, dynamic_ncols=True)
    todo_list = [SlideTodo(ref.path, ref.id, out_dir / f"{ref.id}.h5", settings["mpp_override"],
                           record_attrs(ref.id, identity, settings)) for ref, identity, settings in jobs]
    for res in embed_slides(todo_list, cfg, embedder, patch_size, dtype, progress=progress):
        if res.error is None:
            summary.tiles += res.tiles
            summary.embedded += 1
        else:
            line = slide_message(res.path, res.error)
            summary.failed += 1
            summary.errors.append(error_row(res.slide_id, res.path, "embed", res.kind, line))
            say(f"error: {line}")
        outer.update(1)
    outer.close()
    summary.seconds = time.perf_counter() - t0
    write_parts(out_dir, cohort.shard, summary)

    total = EmbedSummary()
    for s in gather_objects(summary, info):
        total.merge(s)
    if info.is_main and log is not None:
        random = " [RANDOM-INIT model: baseline features]" if encoder.weights_hash == "random-init" else ""
        # every rank's failures, in errors.csv or its parts (one per shard or torchrun rank)
        errors = f" -> {part_name('errors.csv', '*', cohort.shard.count)}" if total.failed else ""
        log(total.line() + errors + random)
    barrier(info)
    return total

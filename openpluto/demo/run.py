"""``openpluto demo``'s steps in order, each one ``openpluto`` command (see ``commands``).

Layout of the demo folder::

    slides/            synthetic slides (+ ground truth), unless --slides is given
    tissue/            tissue masks, GeoJSON and QC overlays (`openpluto tissue`)
    tiles/             WebDataset shards, manifest, QC mosaics (`openpluto tiles`)
    run/               cpu-tiny pretraining run (`openpluto pretrain`)
    pluto-cpu-tiny/    exported teacher backbone (`openpluto export`)
    random-init-cpu-tiny/  the same architecture at its random initialisation
    embeddings/        <slide>.h5 + PC1 heat maps (`openpluto embed`)
    figures/           feature maps vs ground truth (`openpluto embed-pca` + the demo's numbers)
    eval/              labelled held-out tiles, results JSONs, table.md (`openpluto eval`)
    commands.txt       every command run in this folder, across reruns
    summary.json, report.html

A rerun reuses finished steps: slides, tiles and embeddings skip what exists; a finished pretraining
run is kept (a killed or capped one is resumed, and everything after it is redone).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from openpluto.demo.commands import CommandLog
from openpluto.demo.config import PRESET, DemoConfig
from openpluto.demo.evaluation import run_evaluation
from openpluto.demo.feature_step import run_feature_maps
from openpluto.demo.inputs import demo_slides
from openpluto.demo.pretraining import run_pretraining
from openpluto.demo.summary import DemoSummary
from openpluto.errors import OpenPlutoError

MODEL_DIR_NAME = "pluto-cpu-tiny"
RANDOM_DIR_NAME = "random-init-cpu-tiny"  # the same architecture (config.json), random weights
STALE_AFTER_PRETRAINING = (MODEL_DIR_NAME, RANDOM_DIR_NAME, "embeddings", "figures")
N_STEPS = 8


def _step(i: int, title: str) -> None:
    print(f"\n[{i}/{N_STEPS}] {title}", flush=True)


def random_twin(model_dir: Path, dst: Path, seed: int) -> Path:
    """A model dir with ``model_dir``'s exact architecture and random weights: the fair baseline."""
    import torch

    from openpluto.model import build_model, save_pretrained
    from openpluto.model.hub import read_config

    if not (dst / "model.safetensors").is_file():
        torch.manual_seed(seed)
        save_pretrained(build_model(read_config(model_dir)), dst)
    return dst


def _clear_stale(out: Path) -> None:
    """Pretraining ran: outputs made from an earlier encoder must be made again."""
    for name in STALE_AFTER_PRETRAINING:
        shutil.rmtree(out / name, ignore_errors=True)
    for p in (out / "eval").glob("*.json"):
        p.unlink()


def _count_embedded(folder: Path) -> int:
    import h5py

    total = 0
    for p in sorted(folder.glob("*.h5")):
        with h5py.File(p, "r") as f:
            total += int(f["features"].shape[0])
    return total


def run_demo(cfg: DemoConfig, out: Path, log: CommandLog) -> DemoSummary:
    t0 = time.time()
    _step(1, "slides")
    slides_dir, slides = demo_slides(cfg, out)

    _step(2, "tissue detection and QC overlays")
    log.run(["tissue", str(slides_dir), "--out", str(out / "tissue"), "--workers", str(cfg.workers)])

    _step(3, "tiles -> WebDataset shards")
    log.run(["tiles", str(slides_dir), "--out", str(out / "tiles"), "--mpp", *map(str, cfg.mpp),
             "--tile-size", str(cfg.tile_size), "--workers", str(cfg.workers), "--seed", str(cfg.seed)])
    tiles = json.loads((out / "tiles" / "summary.json").read_text())
    if not tiles.get("tiles_total"):
        raise OpenPlutoError(f"no tiles were cut from {slides_dir}: see {out / 'tiles' / 'errors.csv'}")

    _step(4, f"pretraining {PRESET}")
    pre = run_pretraining(cfg, out, log)
    if pre.ran:
        _clear_stale(out)

    _step(5, "export the EMA teacher, and its random-init twin")
    model_dir = out / MODEL_DIR_NAME
    export = ["export", str(out / "run"), "--out", str(model_dir)]
    if (model_dir / "model.safetensors").is_file():
        log.skip(export, f"{model_dir} exists")
    else:
        log.run(export)
    models = {"pretrained": model_dir, "random": random_twin(model_dir, out / RANDOM_DIR_NAME, cfg.seed)}

    _step(6, "whole-slide embeddings")
    log.run(["embed", str(slides_dir), "--model", str(model_dir), "--out", str(out / "embeddings"),
             "--mpp", str(cfg.mpp[-1]), "--tile-size", str(cfg.tile_size),
             "--workers", str(min(cfg.workers, 2)), "--pooling", "cls+mean"])

    _step(7, "feature maps against the ground truth: pretrained vs random init")
    maps = run_feature_maps(cfg, out, slides, models, log)

    _step(8, "evaluation: kNN and linear probe on held-out labelled tiles")
    results = run_evaluation(cfg, out, models, log)

    return DemoSummary(
        n_slides=int(tiles.get("slides_ok", 0)),
        n_tiles=int(tiles.get("tiles_total", 0)),
        n_embedded=_count_embedded(out / "embeddings"),
        pretraining=pre,
        results=results,
        feature_maps=maps,
        minutes_total=round((time.time() - t0) / 60, 2),
    )

"""The steps of ``openpluto demo``, each one ``openpluto`` command, and the report that shows them.

Layout of the demo folder::

    slides/            synthetic slides (+ ground truth), unless --slides is given
    tissue/            tissue masks, GeoJSON and QC overlays (`openpluto tissue`)
    tiles/             WebDataset shards, manifest, QC mosaics (`openpluto tiles`)
    run/               cpu-tiny pretraining run (`openpluto pretrain`)
    pluto-cpu-tiny/    exported teacher backbone (`openpluto export`)
    embeddings/        <slide>.h5 + PC1 heat maps (`openpluto embed`)
    eval/              labelled held-out tiles, results JSONs, table.md (`openpluto eval`)
    figures/           PCA feature maps, pretrained vs random (`openpluto embed-pca`)
    commands.txt       every command the demo ran, in order
    report.html        everything above on one page
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from openpluto.cli.demo import DemoConfig, cli
from openpluto.cli.report import Figure, Section, write_report
from openpluto.errors import OpenPlutoError

PRESET = "cpu-tiny"
MODEL_DIR_NAME = "pluto-cpu-tiny"
RANDOM_DIR_NAME = "random-init-cpu-tiny"  # the same architecture (config.json), random weights


def _step(i: int, n: int, title: str) -> None:
    print(f"\n[{i}/{n}] {title}", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    log = out / "commands.txt"
    log.write_text("")
    n = 8

    _step(1, n, "slides")
    slides = _slides(cfg, out)

    _step(2, n, "tissue detection and QC overlays")
    cli(["tissue", str(slides), "--out", str(out / "tissue"), "--workers", str(cfg.workers)], log)

    _step(3, n, "tiles -> WebDataset shards")
    cli(["tiles", str(slides), "--out", str(out / "tiles"), "--mpp", *map(str, cfg.mpp),
         "--tile-size", str(cfg.tile_size), "--workers", str(cfg.workers), "--seed", str(cfg.seed)], log)
    tiles_summary = json.loads((out / "tiles" / "summary.json").read_text())
    if not tiles_summary.get("tiles_total"):
        raise OpenPlutoError(f"no tiles were cut from {slides}: see {out / 'tiles' / 'errors.csv'}")

    _step(4, n, f"pretraining {PRESET} for about {cfg.minutes:g} min")
    steps = _pretrain(cfg, out, log)

    _step(5, n, "export the EMA teacher")
    model_dir = out / MODEL_DIR_NAME
    if not (model_dir / "model.safetensors").is_file():
        cli(["export", str(out / "run"), "--out", str(model_dir)], log)

    random_dir = _random_twin(model_dir, out / RANDOM_DIR_NAME, cfg.seed)

    _step(6, n, "whole-slide embeddings")
    cli(["embed", str(slides), "--model", str(model_dir), "--out", str(out / "embeddings"),
         "--mpp", str(cfg.mpp[-1]), "--tile-size", str(cfg.tile_size), "--workers", str(min(cfg.workers, 2)),
         "--pooling", "cls+mean"], log)

    _step(7, n, "PCA feature maps: pretrained vs random init")
    figs = out / "figures"
    first_slide = sorted(p for p in slides.iterdir() if p.suffix in (".tiff", ".tif", ".svs", ".ndpi"))[0]
    for label, model in (("pretrained", str(model_dir)), ("random", str(random_dir))):
        cli(["embed-pca", str(first_slide), "--model", model, "--out", str(figs / f"pca_{label}.png"),
             "--mpp", str(cfg.mpp[0]), "--size", "256", "--patch-size", "8"], log)

    _step(8, n, "evaluation: kNN and linear probe on held-out labelled tiles")
    results = _evaluate(cfg, out, model_dir, random_dir, log)

    summary = {
        "n_slides": tiles_summary.get("slides_ok", 0),
        "n_tiles": tiles_summary.get("tiles_total", 0),
        "steps": steps,
        "n_embedded": _count_embedded(out / "embeddings"),
        "results": results,
        "pretrained_wins": any(r["task"].startswith("knn") and r["pretrained_mean"] > r["random_mean"]
                               for r in results),
    }
    _report(cfg, out, summary)
    return summary


def _slides(cfg: DemoConfig, out: Path) -> Path:
    if cfg.slides:
        src = Path(cfg.slides)
        if not src.is_dir():
            raise OpenPlutoError(f"--slides {src} is not a folder of slides")
        print(f"using your slides in {src}")
        return src
    from openpluto.demo.synthetic import make_synthetic_cohort

    dst = out / "slides"
    if not (dst.is_dir() and len(list(dst.glob("*.tiff"))) >= cfg.n_slides):
        t0 = time.time()
        paths = make_synthetic_cohort(dst, n_slides=cfg.n_slides, seed=cfg.seed, size=cfg.slide_size)
        print(f"generated {len(paths)} synthetic slides in {dst} ({time.time() - t0:.1f} s)")
    return dst


def _pretrain(cfg: DemoConfig, out: Path, log: Path) -> int:
    """Time a few steps, then pretrain for as many steps as fit in ``cfg.minutes``; return the steps."""
    from openpluto.train.metrics import read_metrics

    run = out / "run"
    done = run / "demo_done.json"
    if done.is_file():
        return int(json.loads(done.read_text())["steps"])
    if (run / "checkpoint.pt").is_file():  # a demo killed during pretraining: continue that run
        cli(["pretrain", "--out", str(run), "--resume"], log)
        steps = int(read_metrics(run / "metrics.csv")[-1]["step"])
        done.write_text(json.dumps({"steps": steps}) + "\n")
        return steps
    calib = out / "run_calibration"
    shutil.rmtree(calib, ignore_errors=True)
    calib_steps = 8
    t0 = time.time()
    cli(["pretrain", "--config", PRESET, "--data", str(out / "tiles"), "--out", str(calib),
         "--max-steps", str(calib_steps), f"seed={cfg.seed}", "log.log_every=1"], log)
    times = [r["step_time_s"] for r in read_metrics(calib / "metrics.csv")[1:] if r.get("step_time_s")]
    per_step = sum(times) / len(times) if times else (time.time() - t0) / calib_steps
    shutil.rmtree(calib, ignore_errors=True)
    steps = max(20, int(cfg.minutes * 60 / max(per_step, 1e-3)))
    print(f"one step takes {per_step:.2f} s here: pretraining for {steps} steps")
    # Safety net: the trainer checkpoints and stops cleanly on SIGTERM, so a slower machine than the
    # calibration suggested still finishes the demo in time (the schedules are then cut short).
    timer = threading.Timer(cfg.minutes * 60 * 1.5 + 30, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    try:
        cli(["pretrain", "--config", PRESET, "--data", str(out / "tiles"), "--out", str(run),
             "--max-steps", str(steps), f"seed={cfg.seed}",
             f"schedule.warmup_steps={max(2, min(100, steps // 10))}",
             f"schedule.teacher_temp_warmup_steps={max(2, min(300, steps // 3))}",
             f"schedule.freeze_last_layer_steps={max(1, min(50, steps // 20))}"], log)
    finally:
        timer.cancel()
    rows = read_metrics(run / "metrics.csv")
    steps = int(rows[-1]["step"]) if rows else steps
    done.write_text(json.dumps({"steps": steps}) + "\n")
    return steps


def _random_twin(model_dir: Path, dst: Path, seed: int) -> Path:
    """A model dir with ``model_dir``'s exact architecture and random weights: the fair baseline."""
    import torch

    from openpluto.model import build_model, save_pretrained
    from openpluto.model.hub import read_config

    if not (dst / "model.safetensors").is_file():
        torch.manual_seed(seed)
        save_pretrained(build_model(read_config(model_dir)), dst)
    return dst


def _evaluate(cfg: DemoConfig, out: Path, model_dir: Path, random_dir: Path, log: Path) -> list[dict]:
    from openpluto.demo.synthetic import make_synthetic_patch_dataset

    ev = out / "eval"
    data = ev / "heldout_tiles"
    if not (data / "test").is_dir():
        # A different seed from the slides: tissue the encoder has never seen.
        make_synthetic_patch_dataset(data, n_per_class=cfg.patches_per_class, size=cfg.tile_size,
                                     mpp=cfg.mpp[0], seed=cfg.seed + 1000)
    common = ["--data", str(data), "--resize", str(cfg.eval_size), "--cache-dir", str(ev / "cache")]
    files = []
    for label, model in (("pretrained", str(model_dir)), ("random", str(random_dir))):
        knn = ev / f"knn_{label}.json"
        lin = ev / f"linear_{label}.json"
        cli(["eval", "knn", "--model", model, *common, "--task", "knn synthetic tissue",
             "--out", str(knn)], log)
        cli(["eval", "linear", "--model", model, *common, "--task", "linear synthetic tissue",
             "--runs", str(cfg.eval_runs), "--max-steps", str(cfg.eval_steps), "--out", str(lin)], log)
        files += [knn, lin]
    cli(["eval", "table", *map(str, files), "--out", str(ev / "table.md")], log)
    rows = []
    for task in ("knn", "linear"):
        res = {lab: json.loads((ev / f"{task}_{lab}.json").read_text()) for lab in ("pretrained", "random")}
        metric = res["pretrained"]["primary_metric"]
        m = {lab: res[lab]["summary"][metric] for lab in res}
        rows.append({
            "task": f"{task} ({metric})",
            "pretrained": f"{m['pretrained']['mean']:.3f} ± {m['pretrained']['std']:.3f}",
            "random": f"{m['random']['mean']:.3f} ± {m['random']['std']:.3f}",
            "pretrained_mean": m["pretrained"]["mean"],
            "random_mean": m["random"]["mean"],
        })
    return rows


def _count_embedded(folder: Path) -> int:
    import h5py

    total = 0
    for p in sorted(folder.glob("*.h5")):
        with h5py.File(p, "r") as f:
            total += int(f["features"].shape[0])
    return total


def _report(cfg: DemoConfig, out: Path, summary: dict) -> Path:
    tissue = sorted((out / "tissue").glob("*_overlay.png"))
    mosaics = sorted((out / "tiles" / "qc").glob("mosaic_mpp*.png"))
    pc1 = sorted((out / "embeddings").rglob("*pc1*.png"))
    errors = out / "tiles" / "errors.csv"
    n_err = 0
    if errors.is_file():
        with open(errors) as f:
            n_err = max(0, sum(1 for _ in csv.reader(f)) - 1)
    table = [["task", f"pretrained ({MODEL_DIR_NAME})", f"random init ({RANDOM_DIR_NAME})"]]
    for r in summary["results"]:
        better = r["pretrained_mean"] > r["random_mean"]
        table.append([r["task"], f"**{r['pretrained']}**" if better else r["pretrained"],
                      r["random"] if better else f"**{r['random']}**"])
    commands = (out / "commands.txt").read_text()
    sections = [
        Section("Summary", text=(
            f"{summary['n_slides']} slides, {summary['n_tiles']} tiles ({n_err} slides failed), "
            f"{summary['steps']} pretraining steps of {PRESET}, {summary['n_embedded']} tiles embedded. "
            "The encoder is scored on held-out synthetic tissue tiles it never saw, against the same "
            "architecture at random initialisation."), table=table),
        Section("1. Tissue detection", text="Thumbnail with tissue and the excluded artifacts: pen, "
                "blur, folds. Masks and QuPath GeoJSON are in tissue/.",
                figures=[Figure(p, p.stem.replace("_overlay", "")) for p in tissue]),
        Section("2. Training tiles", text="Random tiles from the WebDataset shards at each resolution.",
                figures=[Figure(p, p.stem.replace("mosaic_mpp", "") + " µm/px") for p in mosaics]),
        Section("3. Pretraining", text="Loss terms and collapse monitors over the run (run/metrics.csv, "
                "TensorBoard in run/tb).",
                figures=[Figure(p, p.name) for p in sorted((out / "run").glob("*.png"))]),
        Section("4. Feature maps", text="First three principal components of the patch tokens as RGB "
                "(patch size 8): a pretrained encoder separates tissue structures, a random one mostly "
                "shows colour.",
                figures=[Figure(out / "figures" / "pca_pretrained.png", "pretrained"),
                         Figure(out / "figures" / "pca_random.png", "random init")]),
        Section("5. Slide embeddings", text="First principal component of the tile features over each "
                "slide (embeddings/<slide>.h5).", figures=[Figure(p, p.stem) for p in pc1]),
        Section("6. Benchmark table", code=(out / "eval" / "table.md").read_text()),
        Section("Commands run", code=commands),
    ]
    return write_report(out / "report.html", "openpluto demo", sections,
                        footer=f"openpluto demo --out {cfg.out} --minutes {cfg.minutes:g}")

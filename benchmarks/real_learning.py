r"""Does pretraining learn on real tissue? Trained encoder vs its random twin on real labelled tiles.

    python benchmarks/real_learning.py --out /tmp/real                 # cpu-tiny, 400 steps, LC25000 lung
    # PLUTO-4S on one GPU: its preset schedule is set for 125,000 steps (12,500 of warm-up) at a global
    # batch of 1,536, so a short run scales the batch and the schedule down with it:
    python benchmarks/real_learning.py --out /tmp/real-s --config pluto4s --max-steps 3000 --device cuda \
        global_batch_size=null data.batch_size=128 schedule.warmup_steps=300 \
        schedule.teacher_temp_warmup_steps=1000 schedule.freeze_last_layer_steps=100

1. pretrain ``--config`` for ``--max-steps`` on the *unlabelled* image folder ``--unlabeled`` (a finished
   run in ``OUT/run`` is reused; a killed one resumes), then export its EMA teacher;
2. embed the labelled folder ``--labelled`` (``ROOT/<class>/*``) with the trained encoder and with the
   same architecture at random init, seeds ``seed``, ``seed+1``, ... (``--random-seeds``; the first is
   exactly where pretraining started): tiles resized to ``--resize`` px (default: the preset's global
   crop size, the scale the encoder was trained at), CLS token at ``--patch-size``;
3. ``--splits`` seeded stratified train/val/test splits (``--val-fraction``/``--test-fraction``); on each,
   DINO's 20-NN (fitted on train) and openpluto's eva linear probe (train, early stopping on val), both
   scored on test by balanced accuracy. The same splits serve every encoder, so differences are paired.
   ``--linear logreg`` swaps the eva probe for a logistic regression on train (~100x faster), which is
   how the README's ablation screened recipes;
4. one table (mean ± sd over splits; random init as the mean over seeds with the seeds' range) with the
   margins, plus diagnostics: each encoder's effective rank, and what colour alone gives (the same
   probes on the 6 per-tile RGB means/stds);
5. with ``--probe-every N``: the teacher kept every N steps (``log.keep_every``) probed the same way,
   one row per step, to see when the encoder stops gaining.

Writes ``OUT/real_learning.json`` and ``OUT/real_learning.md``. LC25000 holds near-duplicates (its
authors augmented 250 source images per class), so the absolute numbers are optimistic: compare
encoders with it, do not quote it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "patches"
DEFAULT_UNLABELED = SHARED / "lc25000_lung_unlabeled"
DEFAULT_LABELLED = SHARED / "lc25000_lung_dev"
PROBES = ("knn", "linear")


def effective_rank(x: np.ndarray) -> float:
    """exp(entropy of the normalised singular values) of centred features [N, D] (Roy & Vetterli 2007)."""
    s = np.linalg.svd(x - x.mean(0, keepdims=True), compute_uv=False)
    p = s / max(s.sum(), 1e-12)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def colour_features(records, resize: int) -> np.ndarray:
    """Per-tile RGB mean and std [N, 6] of the tiles as the encoders see them (0..1)."""
    from openpluto.embed.images import iter_image_batches

    out = []
    for batch, _ in iter_image_batches(records.paths, resize, 64):
        x = batch.float().div(255).flatten(2)
        out.append(np.concatenate([x.mean(2).numpy(), x.std(2).numpy()], 1))
    return np.concatenate(out).astype(np.float32)


def make_splits(labels: np.ndarray, n: int, val_fraction: float, test_fraction: float) -> list[np.ndarray]:
    """``n`` seeded stratified splits (seeds 0..n-1), each an array of train/val/test per item."""
    from openpluto.eval.data import stratified_split

    return [np.array(stratified_split(labels, val_fraction, test_fraction, seed)) for seed in range(n)]


def logreg_probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Screening probe: standardised features, L2 logistic regression (C = 0.1); test balanced accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from openpluto.eval.metrics import balanced_accuracy

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(*train)
    return balanced_accuracy(test[1], model.predict(test[0]))


def probe_scores(x: np.ndarray, y: np.ndarray, splits: list[np.ndarray], n_classes: int,
                 linear: str = "eva") -> dict:
    """Test balanced accuracy of 20-NN and the linear probe on each split -> {probe: [n_splits]}.

    ``linear``: ``eva`` (openpluto's eva probe: train, early stopping on val) or ``logreg`` (sklearn
    logistic regression on train only, ~100x faster: for screening recipes)."""
    from openpluto.eval.config import KnnConfig, LinearConfig
    from openpluto.eval.knn import knn_predict
    from openpluto.eval.linear import linear_probe_settings, train_linear_probe
    from openpluto.eval.metrics import balanced_accuracy
    from openpluto.eval.runtime import cpu_threads

    kc, lc = KnnConfig(), LinearConfig()
    out: dict[str, list[float]] = {p: [] for p in PROBES}
    with cpu_threads(1):  # tiny heads: more OpenMP threads only spin
        for i, split in enumerate(splits):
            tr, va, te = (split == s for s in ("train", "val", "test"))
            pred = knn_predict(x[tr], y[tr], x[te], n_classes, kc.k, kc.temperature).argmax(1)
            out["knn"].append(balanced_accuracy(y[te], pred))
            if linear == "logreg":
                out["linear"].append(logreg_probe((x[tr], y[tr]), (x[te], y[te])))
                continue
            run = train_linear_probe((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), n_classes, seed=i,
                                     **linear_probe_settings(lc))
            out["linear"].append(run["balanced_accuracy"])
    return out


def build_encoders(cfg, model_dir: Path, n_random: int, device: str) -> dict:
    """{label: Encoder}: the trained teacher and the random twins (seeds cfg.seed + i)."""
    import torch

    from openpluto.model import build_model
    from openpluto.model.encoder import RANDOM_INIT, PlutoEncoder, load_encoder

    encoders = {"trained": load_encoder(model_dir, device)}
    for i in range(n_random):
        torch.manual_seed(cfg.seed + i)  # as build_meta: seed cfg.seed is the run's own starting point
        model = build_model(cfg.model, **cfg.model_overrides)
        encoders[f"random_seed{cfg.seed + i}"] = PlutoEncoder(model, cfg.model, RANDOM_INIT).to(device).eval()
    return encoders


def pretrain_run(args, out: Path):
    """Pretrain (or reuse/resume ``OUT/run``) and export the teacher to ``OUT/model``; (cfg, summary)."""
    from openpluto.train.config import load_train_config
    from openpluto.train.export import export_teacher
    from openpluto.train.trainer import pretrain

    cfg = load_train_config(
        args.config,
        [f"data.path={args.unlabeled}", f"max_steps={args.max_steps}", f"data.num_workers={args.workers}",
         "log.progress=false", *([f"log.keep_every={args.probe_every}"] if args.probe_every else []),
         *args.overrides],
    )
    summary = pretrain(cfg, out / "run", resume=True)
    export_teacher(out / "run", out / "model")
    return cfg, summary


def cls_features(encoder, records, patch_size: int, resize: int) -> np.ndarray:
    """CLS features [N, D] of the labelled tiles at ``resize`` px, ``patch_size``: what every probe sees."""
    from openpluto.embed.images import embed_images

    return embed_images(encoder, records, patch_size, "cls", 64, 0, resize, progress=False)[0]


def probe_trajectory(args, final_step: int, records, splits: list[np.ndarray], resize: int,
                     random_mean: dict[str, float], device: str) -> list[dict]:
    """Probe the teacher of every checkpoint the run kept before its last step (``--probe-every``):
    [{step, knn, linear, knn_margin, linear_margin}], margins over ``random_mean`` (the twins' mean per
    probe)."""
    from openpluto.model.encoder import load_encoder
    from openpluto.train.checkpoint import kept_steps
    from openpluto.train.export import export_teacher

    rows = []
    for step in (s for s in kept_steps(args.out / "run") if s < final_step):
        model_dir = export_teacher(args.out / "run", args.out / "models" / f"step_{step:07d}", step=step)
        x = cls_features(load_encoder(model_dir, device), records, args.patch_size, resize)
        scores = probe_scores(x, records.labels, splits, len(records.classes), args.linear)
        row = {"step": step}
        for p in PROBES:
            row[p] = float(np.mean(scores[p]))
            row[f"{p}_margin"] = row[p] - random_mean[p]
        rows.append(row)
    return rows


def last_logged(summary: dict, run_dir: Path) -> dict:
    """The run's last logged values: from the trainer's summary, or, when a finished run was reused
    (no step taken now), the last row of ``run_dir/metrics.csv``."""
    if summary.get("last"):
        return summary["last"]
    from openpluto.train.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
    return rows[-1] if rows else {}


def mean_sd(runs: list[float]) -> dict:
    """``{mean, sd (ddof 1; 0 for one run), runs (rounded to 4 places)}`` of per-split scores."""
    return {"mean": float(np.mean(runs)), "sd": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0,
            "runs": [round(float(s), 4) for s in runs]}


def summarise(scores: dict[str, dict[str, list[float]]], random_labels: list[str]) -> dict:
    """Means/sds per encoder and probe, random seeds pooled, and the trained-minus-random margins."""
    rows = {label: {p: mean_sd(v) for p, v in per.items()} for label, per in scores.items()}
    margins = {}
    for p in PROBES:
        seed_means = [rows[r][p]["mean"] for r in random_labels]
        diffs = [np.subtract(scores["trained"][p], scores[r][p]) for r in random_labels]
        t = rows["trained"][p]["mean"]
        margins[p] = {
            "random_mean": float(np.mean(seed_means)),
            "random_seed_range": [float(min(seed_means)), float(max(seed_means))],
            "over_random_mean": t - float(np.mean(seed_means)),
            "over_best_random_seed": t - float(max(seed_means)),
            "paired_sd": float(np.mean([np.std(d, ddof=1) for d in diffs])) if len(diffs[0]) > 1 else 0.0,
        }
    return {"rows": rows, "margins": margins}


def format_table(result: dict) -> str:
    """Markdown table: one row per probe, trained vs random init (and colour statistics)."""
    s, m = result["summary"]["rows"], result["summary"]["margins"]
    rnd = result["random_labels"]
    n = result["settings"]["splits"]
    lines = [
        f"| balanced accuracy ({n} splits, mean ± sd) | trained | random init ({len(rnd)} seeds: mean, "
        "range) | margin over random mean | over best random seed | colour statistics only |",
        "|---|---|---|---|---|---|",
    ]
    for p in PROBES:
        t = s["trained"][p]
        sd_r = np.mean([s[r][p]["sd"] for r in rnd])
        lo, hi = m[p]["random_seed_range"]
        lines.append(
            f"| {p} | **{t['mean']:.3f} ± {t['sd']:.3f}** | {m[p]['random_mean']:.3f} ± {sd_r:.3f} "
            f"({lo:.3f}–{hi:.3f}) | {m[p]['over_random_mean']:+.3f} | {m[p]['over_best_random_seed']:+.3f} "
            f"| {s['colour'][p]['mean']:.3f} ± {s['colour'][p]['sd']:.3f} |"
        )
    if result.get("trajectory"):
        lines += ["", "| teacher at step | kNN (margin) | linear (margin) |", "|---|---|---|"]
        last = {"step": result["steps"], **{p: s["trained"][p]["mean"] for p in PROBES},
                **{f"{p}_margin": m[p]["over_random_mean"] for p in PROBES}}
        for r in [*result["trajectory"], last]:
            lines.append(f"| {r['step']} | {r['knn']:.3f} ({r['knn_margin']:+.3f}) | "
                         f"{r['linear']:.3f} ({r['linear_margin']:+.3f}) |")
    d = result["diagnostics"]
    ranks = ", ".join(f"{k} {v:.1f}" for k, v in d["effective_rank"].items())
    lines += ["", f"effective rank of the features: {ranks}; teacher entropy at the end "
              f"{d.get('teacher_entropy') or float('nan'):.2f} of ln(prototypes) = {d['max_entropy']:.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default="cpu-tiny", help="training preset or YAML file")
    ap.add_argument("--unlabeled", type=Path, default=DEFAULT_UNLABELED, help="image folder to pretrain on")
    ap.add_argument("--labelled", type=Path, default=DEFAULT_LABELLED, help="ROOT/<class>/* to probe on")
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--random-seeds", type=int, default=3, help="random-init twins (seed, seed+1, ...)")
    ap.add_argument("--splits", type=int, default=20, help="repeated stratified splits")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--resize", type=int, default=None, help="probe resolution in px (default: global crop)")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--linear", choices=("eva", "logreg"), default="eva",
                    help="linear probe: eva (the reported one) or logreg (fast, for screening recipes)")
    ap.add_argument("--probe-every", type=int, default=0, metavar="N",
                    help="also probe the teacher kept every N steps (log.keep_every=N): a row per step")
    ap.add_argument("--workers", type=int, default=1, help="pretraining DataLoader workers")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first touches CUDA: pretraining on CPU too
    import torch

    from openpluto.embed.images import ImageRecords

    for folder in (args.unlabeled, args.labelled):
        if not folder.is_dir():
            print(f"error: {folder} is not a folder (give --unlabeled/--labelled)", file=sys.stderr)
            return 1
    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg, summary = pretrain_run(args, args.out)
    t_pretrain = time.time() - t0
    resize = args.resize or cfg.ssl.crops.global_size
    records = ImageRecords.from_source(args.labelled)
    y, n_classes = records.labels, len(records.classes)
    splits = make_splits(y, args.splits, args.val_fraction, args.test_fraction)
    encoders = build_encoders(cfg, args.out / "model", args.random_seeds, device)
    feats = {label: cls_features(enc, records, args.patch_size, resize) for label, enc in encoders.items()}
    feats["colour"] = colour_features(records, resize)
    scores = {label: probe_scores(x, y, splits, n_classes, args.linear) for label, x in feats.items()}
    random_labels = [k for k in encoders if k.startswith("random")]
    summed = summarise(scores, random_labels)
    last = last_logged(summary, args.out / "run")
    result = {
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "resize": resize, "n_images": len(records), "classes": records.classes},
        "steps": summary["steps"],
        "pretrain_minutes": round(t_pretrain / 60, 2),
        "random_labels": random_labels,
        "summary": summed,
        "trajectory": probe_trajectory(args, summary["steps"], records, splits, resize,
                                       {p: summed["margins"][p]["random_mean"] for p in PROBES}, device),
        "diagnostics": {
            "effective_rank": {k: effective_rank(v) for k, v in feats.items() if k != "colour"},
            "feature_dim": int(feats["trained"].shape[1]),
            "teacher_entropy": last.get("teacher_entropy"),
            "max_entropy": float(np.log(cfg.ssl.heads.out_dim)),
            "last_losses": {k: last.get(k) for k in ("total", "dino_local", "dino_global", "ibot", "koleo",
                                                       "student_feat_std")},
        },
    }
    (args.out / "real_learning.json").write_text(json.dumps(result, indent=2))
    table = format_table(result)
    (args.out / "real_learning.md").write_text(table + "\n")
    print(table)
    print(f"({summary['steps']} steps in {t_pretrain / 60:.1f} min; probes at {resize} px, patch "
          f"{args.patch_size}; {len(records)} labelled tiles; results in {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

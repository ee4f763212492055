"""Does ``cpu-tiny`` pretraining learn? Held-out accuracy on synthetic tissue, trained vs random init.

    python benchmarks/pretrain_knn.py --out /tmp/knn --max-steps 300

1. ``make_synthetic_patch_dataset`` -> labelled 96 px tiles (6 tissue classes, ``--n-per-class`` split
   60/20/20 into train/val/test, each split with its own stains);
2. ``cpu-tiny`` pretraining on the *unlabelled* train tiles (``--max-steps``; ``--minutes`` is an optional
   cap, the trainer's own ``max_minutes``);
3. teacher backbone vs the same architecture at random init (``--random-seeds`` draws, so the
   baseline's own spread is visible): CLS embeddings at patch 16 and 8 of the tiles resized to 64 px;
   20-NN (cosine, distance-weighted) and a logistic-regression probe fitted on train, accuracy on
   test. Writes ``OUT/knn.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def embed_folder(
    model: torch.nn.Module, root: Path, patch: int, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """CLS features [N, D] and integer labels of ``root/<class>/*.png``."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.cfg.std).view(1, 3, 1, 1)
    feats, labels = [], []
    paths = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).glob("*.png"))]
    model.eval()
    with torch.no_grad():
        for s in range(0, len(paths), 64):
            chunk = paths[s : s + 64]
            x = (
                torch.stack(
                    [
                        torch.from_numpy(
                            np.array(
                                Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
                            )
                        ).permute(2, 0, 1)
                        for p, _ in chunk
                    ]
                ).float()
                / 255
            )
            feats.append(model.embed((x - mean) / std, patch_size=patch))
            labels += [i for _, i in chunk]
    return torch.cat(feats).numpy(), np.array(labels)


def probe_accuracies(model: torch.nn.Module, data: Path, patch: int, k: int = 20) -> dict[str, float]:
    """Test accuracy of a k-NN (cosine) and a linear (logistic regression) classifier fitted on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = embed_folder(model, data / "train", patch)
    xte, yte = embed_folder(model, data / "test", patch)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance").fit(xtr, ytr)
    linear = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(xtr, ytr)
    return {
        "knn": round(float((knn.predict(xte) == yte).mean()), 4),
        "linear": round(float((linear.predict(xte) == yte).mean()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=None,
                    help="optional pretraining time cap (max_minutes); the default runs all --max-steps")
    ap.add_argument("--n-per-class", type=int, default=300, help="tiles per class over train/val/test")
    ap.add_argument("--random-seeds", type=int, default=3, help="random-init baselines to draw")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="extra cpu-tiny overrides key=value")
    args = ap.parse_args(argv)

    from openpluto.demo.synthetic import make_synthetic_patch_dataset
    from openpluto.model import build_model, load_pretrained
    from openpluto.train.config import load_train_config
    from openpluto.train.export import export_teacher
    from openpluto.train.trainer import pretrain

    data = args.out / "patches"
    if not (data / "test").is_dir():
        make_synthetic_patch_dataset(data, n_per_class=args.n_per_class, size=96, mpp=0.5, seed=0)
    run = args.out / "run"
    cfg = load_train_config(
        "cpu-tiny",
        [
            f"data.path={data / 'train'}",
            f"max_steps={args.max_steps}",
            f"data.num_workers={args.workers}",
            "log.progress=false",
            *([f"max_minutes={args.minutes}"] if args.minutes else []),
            *args.overrides,
        ],
    )
    t0 = time.time()
    summary = pretrain(cfg, run, resume=True)
    minutes = (time.time() - t0) / 60
    export_teacher(run, args.out / "model")
    trained = load_pretrained(args.out / "model")
    result = {
        "steps": summary["steps_done"],
        "pretrain_minutes": round(minutes, 2),
        "last_losses": {
            k: summary["last"].get(k)
            for k in ("total", "dino_local", "ibot", "koleo", "teacher_entropy", "student_feat_std")
        },
    }
    randoms = []
    for seed in range(args.random_seeds):
        torch.manual_seed(cfg.seed + seed)
        randoms.append(build_model(cfg.model, **cfg.model_overrides))
    for patch in (16, 8):
        acc = probe_accuracies(trained, data, patch)
        base = [probe_accuracies(m, data, patch) for m in randoms]
        for probe in ("knn", "linear"):
            runs = [b[probe] for b in base]
            result[f"{probe}_acc_trained_p{patch}"] = acc[probe]
            result[f"{probe}_acc_random_p{patch}"] = round(float(np.mean(runs)), 4)
            result[f"{probe}_acc_random_p{patch}_runs"] = runs
    (args.out / "knn.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    head = f"random init (mean of {len(randoms)})"
    print(f"{'probe':8s} {'patch':>5s} {'trained':>8s} {head:>24s}")
    for patch in (16, 8):
        for probe in ("knn", "linear"):
            t, r = result[f"{probe}_acc_trained_p{patch}"], result[f"{probe}_acc_random_p{patch}_runs"]
            print(f"{probe:8s} {patch:5d} {t:8.3f} {np.mean(r):12.3f} (min {min(r):.3f}, max {max(r):.3f})")
    n_classes = len([d for d in (data / "test").iterdir() if d.is_dir()])
    print(f"chance = {1 / n_classes:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

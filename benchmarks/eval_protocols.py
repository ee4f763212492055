"""CPU time of each evaluation protocol on a ~1,000-image dataset with a ViT-S (pluto4s preset).

    python benchmarks/eval_protocols.py --n-per-class 167 --out benchmarks/results/eval_protocols.json

Data: ``openpluto.demo.synthetic.make_synthetic_patch_dataset`` (6 classes x 167 = 1,002 tiles at
224 px, split 60/20/20). Encoder: ``pluto4s`` with random weights (timings do not depend on them),
patch 16. Protocols run with their published defaults, except segmentation, whose 2,000 decoder
steps (batch 64 at 224 px) are timed over ``--seg-steps`` steps and extrapolated. ABMIL uses the
same 1,002 tile embeddings grouped into bags of 10 (100 "slides"). Regression uses them with 50
synthetic targets and 5 folds. The encoder runs once (CLS embeddings and patch-token maps together),
as the feature cache does in practice; protocol rows exclude it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-class", type=int, default=167, help="tiles per class (6 classes)")
    ap.add_argument("--model", default="pluto4s")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--resize", type=int, default=224)
    ap.add_argument(
        "--probe-patch-size",
        type=int,
        default=None,
        help="also time the encoder at this patch size on --probe-images images (e.g. 16 when "
        "--patch-size 32 keeps a slow CPU run short)",
    )
    ap.add_argument("--probe-images", type=int, default=64)
    ap.add_argument("--linear-runs", type=int, default=5)
    ap.add_argument("--abmil-runs", type=int, default=20)
    ap.add_argument(
        "--seg-steps", type=int, default=3, help="decoder steps actually run (extrapolated to 2,000)"
    )
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temp folder)")
    ap.add_argument("--out", default="benchmarks/results/eval_protocols.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from openpluto.demo.synthetic import make_synthetic_patch_dataset
    from openpluto.embed.images import ImageRecords
    from openpluto.eval.abmil import train_abmil
    from openpluto.eval.data import load_encoder_seeded
    from openpluto.eval.knn import knn_predict
    from openpluto.eval.linear import train_linear_probe
    from openpluto.eval.metrics import balanced_accuracy
    from openpluto.eval.regression import ridge_fold
    from openpluto.eval.segmentation import ConvDecoderWithImage, _scores, train_segmentation

    work = Path(args.workdir or tempfile.mkdtemp(prefix="eval_bench_"))
    data = work / "patches"
    if not data.is_dir():
        make_synthetic_patch_dataset(data, n_per_class=args.n_per_class, size=224, seed=0)
    records = ImageRecords.from_source(data)
    n = len(records)
    encoder = load_encoder_seeded(args.model)
    rows: dict[str, dict] = {}

    print(f"{n} images, {args.model} patch {args.patch_size}, {args.threads} threads")
    # One frozen forward pass gives both the CLS embeddings (linear, kNN, ABMIL, regression) and the
    # patch-token maps (segmentation): the encoder cost is paid once, as the cache does in practice.
    from openpluto.embed.images import iter_image_batches, normalise

    def forward_all():
        cls, maps, imgs = [], [], []
        with torch.inference_mode():
            for batch, _ in iter_image_batches(records.paths, args.resize, 32, 0, progress="forward"):
                f = encoder.forward_features(normalise(batch, encoder.mean, encoder.std), args.patch_size)
                h, w = f["grid"]
                cls.append(f["cls"].float())
                maps.append(f["patch"].float().transpose(1, 2).reshape(len(batch), -1, h, w))
                imgs.append(batch)
        return torch.cat(cls).numpy(), torch.cat(maps), torch.cat(imgs)

    if args.probe_patch_size and args.probe_patch_size != args.patch_size:
        # the encoder's own cost at --probe-patch-size, timed on a subset and extrapolated to n
        sub = records.subset(list(range(0, n, max(1, n // args.probe_images)))[: args.probe_images])

        def probe():
            with torch.inference_mode():
                for batch, _ in iter_image_batches(sub.paths, args.resize, 32, 0, progress="probe"):
                    encoder.forward_features(
                        normalise(batch, encoder.mean, encoder.std), args.probe_patch_size
                    )

        _, p_wall, p_cpu = _timed(probe)
        rows[f"encoder forward at patch {args.probe_patch_size} ({len(sub)} images, scaled to {n})"] = {
            "wall_s": p_wall * n / len(sub),
            "cpu_s": p_cpu * n / len(sub),
            "images_per_s": len(sub) / p_wall,
        }
    (feats, tok, raw), e_wall, e_cpu = _timed(forward_all)
    rows[f"encoder forward at patch {args.patch_size} (embeddings + patch tokens, once)"] = {
        "wall_s": e_wall,
        "cpu_s": e_cpu,
        "images_per_s": n / e_wall,
    }
    labels = records.labels
    part = {s: np.array([x == s for x in records.splits]) for s in ("train", "val", "test")}
    tr, va, te = ((feats[part[s]], labels[part[s]]) for s in ("train", "val", "test"))
    lin, l_wall, l_cpu = _timed(
        lambda: [train_linear_probe(tr, va, te, len(records.classes), s) for s in range(args.linear_runs)]
    )
    rows[f"linear ({args.linear_runs} runs, <=12,500 steps, eva defaults)"] = {
        "wall_s": l_wall,
        "cpu_s": l_cpu,
        "steps": [r["steps"] for r in lin],
        "balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in lin])),
    }
    pred, k_wall, k_cpu = _timed(lambda: knn_predict(*tr, te[0], len(records.classes)).argmax(1))
    rows["knn (k=20, T=0.07)"] = {
        "wall_s": k_wall,
        "cpu_s": k_cpu,
        "balanced_accuracy": balanced_accuracy(te[1], pred),
    }

    # ABMIL: bags of 10 tile embeddings, bag label = majority tile class
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    bags, bag_labels, splits = [], [], []
    for i in range(0, n - 9, 10):
        idx = order[i : i + 10]
        bags.append(feats[idx])
        bag_labels.append(int(np.bincount(labels[idx]).argmax()))
        splits.append(("train", "train", "train", "val", "test")[(i // 10) % 5])
    abmil_runs, a_wall, a_cpu = _timed(
        lambda: [
            train_abmil(bags, np.array(bag_labels), splits, len(records.classes), s)
            for s in range(args.abmil_runs)
        ]
    )
    rows[f"abmil ({args.abmil_runs} runs, <=100 epochs, patience 20, {len(bags)} bags x 10)"] = {
        "wall_s": a_wall,
        "cpu_s": a_cpu,
        "epochs": [r["epochs"] for r in abmil_runs],
    }

    # regression: 50 targets that depend on the features, 5 folds
    w = rng.normal(size=(feats.shape[1], 50)) / np.sqrt(feats.shape[1])
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    y = np.expm1(np.clip(z @ w + 2 + rng.normal(0, 0.5, (n, 50)), 0, None))
    folds = np.arange(n) % 5
    reg, r_wall, r_cpu = _timed(
        lambda: [
            ridge_fold(feats[folds != f], y[folds != f], feats[folds == f], y[folds == f]) for f in range(5)
        ]
    )
    rows["regression (PCA 256 + ridge, 5 folds, 50 targets)"] = {
        "wall_s": r_wall,
        "cpu_s": r_cpu,
        "pearson": float(np.mean([r["pearson_mean"] for r in reg])),
    }

    # segmentation: mask = tile class (1..C) over the centre square, background around it
    size = args.resize
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    q = size // 4
    masks[:, q : size - q, q : size - q] = torch.from_numpy(labels + 1)[:, None, None]
    img = normalise(raw, encoder.mean, encoder.std)
    c = len(records.classes) + 1
    itr, iva = (torch.from_numpy(np.flatnonzero(part[s])) for s in ("train", "val"))
    seg_train = (tok[itr], img[itr], masks[itr])
    seg_val = (tok[iva], img[iva], masks[iva])
    _, s_wall, s_cpu = _timed(
        lambda: train_segmentation(
            seg_train, seg_val, None, c, seed=0, max_steps=args.seg_steps, val_every=10**9
        )
    )
    dec = ConvDecoderWithImage(tok.shape[1], c)
    _, v_wall, v_cpu = _timed(lambda: _scores(dec, *seg_val, c, 64, "cpu"))  # train_segmentation's final pass
    step_wall = max(s_wall - v_wall, 1e-9) / args.seg_steps
    step_cpu = max(s_cpu - v_cpu, 1e-9) / args.seg_steps
    passes = 2000 / max(1, -(-len(itr) // 64))  # validations: one per pass over the training set
    rows["segmentation (2,000 steps, batch 64, decoder only; extrapolated)"] = {
        "wall_s": 2000 * step_wall + (passes + 1) * v_wall,
        "cpu_s": 2000 * step_cpu + (passes + 1) * v_cpu,
        "step_wall_s": step_wall,
        "val_pass_wall_s": v_wall,
        "measured_steps": args.seg_steps,
    }

    out = {
        "n_images": n,
        "model": args.model,
        "patch_size": args.patch_size,
        "resize": args.resize,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print("| protocol | wall (s) | CPU (s) | notes |\n|---|---:|---:|---|")
    for name, r in rows.items():
        note = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in r.items()
            if k not in ("wall_s", "cpu_s")
        }
        print(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {json.dumps(note)} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

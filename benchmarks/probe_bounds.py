"""What bounds a real_learning run's linear probe: the probe, the features, the labels or the tiles?

    python benchmarks/real_learning.py --out /tmp/real --device cpu     # first: pretrain and probe
    python benchmarks/probe_bounds.py --out /tmp/real                   # then: this, on the same run

On the trained teacher (``OUT/model``), its random twins and the splits of a finished
``benchmarks/real_learning.py`` run (settings read from ``OUT/real_learning.json``):

1. **classifiers**: a logistic regression and an RBF SVM, each with C chosen on every split's
   validation part, on the standardised CLS features the eva probe sees. If they find no more than the
   eva probe, the features set the score, not the probe;
2. **labels**: the same ViT trained with the labels of each split's train part (random-resized crops at
   the probe resolution, flips and 90° turns; early stopping on val), fine-tuned from the trained
   teacher and from random init, on the first ``--supervised-splits`` splits: what the labelled tiles
   give this architecture at this resolution;
3. **errors**: each tile's error rate under the trained encoder's logistic regression over the splits
   it was tested in, the confusion matrix, and ``OUT/hard_tiles.png``: per class, the tiles that are
   wrong most often, with the class they are taken for.

Writes ``OUT/probe_bounds.json`` and ``OUT/probe_bounds.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_learning as rl  # noqa: E402

C_LOGREG = (0.001, 0.01, 0.1, 1.0, 10.0)
C_SVM = (0.3, 1.0, 3.0, 10.0, 30.0)
SUPERVISED_LR = {"scratch": 1e-3, "fine-tuned": 5e-4}  # AdamW, weight decay 0.05, batch 32


def read_run(out: Path) -> dict:
    """``real_learning.json`` of the run in ``out`` (a one-line error when there is none)."""
    path = out / "real_learning.json"
    if not path.is_file() or not (out / "model").is_dir():
        raise SystemExit(f"error: {out} holds no finished real_learning run (run benchmarks/real_learning.py "
                         f"--out {out} first)")
    return json.loads(path.read_text())


def best_on_val(models: list, train: tuple, val: tuple):
    """The model (fitted on ``train``) with the best balanced accuracy on ``val``; the first on ties."""
    from openpluto.eval.metrics import balanced_accuracy

    scores = [balanced_accuracy(val[1], m.fit(*train).predict(val[0])) for m in models]
    return models[int(np.argmax(scores))]


def tuned_probes(x: np.ndarray, y: np.ndarray, splits: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    """Balanced accuracy per split of logreg and RBF SVM (C chosen on val), and logreg's test predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from openpluto.eval.metrics import balanced_accuracy

    scores: dict[str, list[float]] = {"logreg": [], "svm": []}
    predictions = []
    for split in splits:
        tr, va, te = (split == s for s in ("train", "val", "test"))
        scale = StandardScaler().fit(x[tr])
        train, val, test = ((scale.transform(x[m]), y[m]) for m in (tr, va, te))
        for name, models in (("logreg", [LogisticRegression(C=c, max_iter=3000) for c in C_LOGREG]),
                             ("svm", [SVC(C=c, gamma="scale") for c in C_SVM])):
            pred = best_on_val(models, train, val).predict(test[0])
            scores[name].append(balanced_accuracy(test[1], pred))
            if name == "logreg":
                predictions.append(pred)
    return scores, predictions


def tile_errors(y: np.ndarray, splits: list[np.ndarray], predictions: list[np.ndarray], n_classes: int
                ) -> dict:
    """Per tile: share of its test appearances predicted wrong and the class it is most often taken for;
    the confusion matrix over all test appearances (rows: true class)."""
    wrong = np.zeros(len(y))
    seen = np.zeros(len(y))
    taken_for = np.zeros((len(y), n_classes))
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for split, pred in zip(splits, predictions):
        idx = np.nonzero(split == "test")[0]
        seen[idx] += 1
        wrong[idx] += pred != y[idx]
        taken_for[idx, pred] += 1
        np.add.at(confusion, (y[idx], pred), 1)
    rate = np.divide(wrong, seen, out=np.full(len(y), np.nan), where=seen > 0)
    return {"error_rate": rate, "taken_for": taken_for.argmax(1), "confusion": confusion}


def load_tiles(paths: list[str]) -> list:
    """Each tile as uint8 ``[3, H, W]`` at its own size (the source of the training crops)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(TF.pil_to_tensor(im.convert("RGB")))
    return out


def probe_inputs(paths: list[str], resize: int):
    """uint8 ``[N, 3, resize, resize]``: the tiles exactly as the probes embed them."""
    import torch

    from openpluto.embed.images import iter_image_batches

    return torch.cat([b for b, _ in iter_image_batches(paths, resize, 64)])


class CropSampler:
    """Training views: a random-resized crop (the pretraining global crop scale) to ``resize`` px, random
    horizontal flip and 90° turn, normalised with the encoder's mean/std."""

    def __init__(self, tiles: list, resize: int, scale: tuple[float, float], mean, std):
        from torchvision.transforms import InterpolationMode, v2

        self.tiles, self.mean, self.std = tiles, mean, std
        self.crop = v2.RandomResizedCrop(resize, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC,
                                         antialias=True)

    def __call__(self, idx: np.ndarray):
        import torch

        from openpluto.embed.images import normalise

        views = []
        for i in idx:
            v = self.crop(self.tiles[i])
            if torch.rand(()) < 0.5:
                v = v.flip(-1)
            views.append(torch.rot90(v, int(torch.randint(4, ())), (-2, -1)))
        return normalise(torch.stack(views), self.mean, self.std)


def train_supervised(backbone, sample: CropSampler, full, y: np.ndarray, split: np.ndarray, n_classes: int,
                     lr: float, patch_size: int, epochs: int, patience: int, seed: int, device: str = "cpu"
                     ) -> float:
    """Train ``backbone`` + a linear head on the split's train tiles (on ``device``; ``full``, the
    normalised probe inputs, already there); test balanced accuracy at the epoch with the best validation
    balanced accuracy (stops after ``patience`` epochs without a better one)."""
    import torch
    import torch.nn.functional as F

    from openpluto.eval.metrics import balanced_accuracy

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    backbone.to(device)
    head = torch.nn.Linear(backbone.embed_dim, n_classes).to(device)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    tr, va, te = (np.nonzero(split == s)[0] for s in ("train", "val", "test"))
    labels = torch.from_numpy(y).to(device)

    def logits(x):
        return head(backbone.forward_features(x, patch_size)["cls"])

    def predict(idx):
        return logits(full[idx]).argmax(1).cpu().numpy()

    best_val, best_test, since = -1.0, 0.0, 0
    for _ in range(epochs):
        backbone.train()
        order = rng.permutation(tr)
        for b in range(0, len(order), 32):
            idx = order[b: b + 32]
            loss = F.cross_entropy(logits(sample(idx).to(device)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        backbone.eval()
        with torch.no_grad():
            val = balanced_accuracy(y[va], predict(va))
            if val > best_val:
                best_val, since = val, 0
                best_test = balanced_accuracy(y[te], predict(te))
            else:
                since += 1
        if since >= patience:
            break
    return float(best_test)


def supervised_scores(cfg, trained, records, splits: list[np.ndarray], resize: int, patch_size: int,
                      epochs: int, patience: int, device: str = "cpu") -> dict[str, list[float]]:
    """Test balanced accuracy per split of the ViT trained with labels: fine-tuned from the trained
    teacher (the :class:`~openpluto.model.encoder.PlutoEncoder` ``trained``, left as it is) and from
    random init (seed ``cfg.seed + split``)."""
    import torch

    from openpluto.embed.images import normalise
    from openpluto.model import build_model

    mean, std = trained.mean, trained.std
    trained_state = {k: v.cpu() for k, v in trained.backbone.state_dict().items()}
    sample = CropSampler(load_tiles(records.paths), resize, cfg.ssl.crops.global_scale, mean, std)
    full = normalise(probe_inputs(records.paths, resize), mean, std, device)
    out: dict[str, list[float]] = {"fine-tuned": [], "scratch": []}
    for i, split in enumerate(splits):
        for start in out:
            torch.manual_seed(cfg.seed + i)
            backbone = build_model(cfg.model, **cfg.model_overrides)
            if start == "fine-tuned":
                backbone.load_state_dict(trained_state)  # copies the values in
            out[start].append(train_supervised(backbone, sample, full, records.labels, split,
                                               len(records.classes), SUPERVISED_LR[start], patch_size,
                                               epochs, patience, seed=cfg.seed + i, device=device))
            print(f"supervised {start}, split {i}: {out[start][-1]:.3f}", file=sys.stderr, flush=True)
    return out


def hard_tiles_figure(records, errors: dict, path: Path, per_class: int = 8) -> int:
    """Save the tiles wrong most often (in more than half their test appearances), ``per_class`` per class,
    titled with the error rate and the class they are taken for; returns how many are shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from openpluto.io import atomic_path

    rate, taken = errors["error_rate"], errors["taken_for"]
    rows = []
    for c, name in enumerate(records.classes):
        idx = [i for i in np.argsort(-np.nan_to_num(rate, nan=-1.0), kind="stable")
               if records.labels[i] == c and rate[i] > 0.5][:per_class]
        rows.append((name, idx))
    n_rows = max(1, sum(1 for _, idx in rows if idx))
    fig, axes = plt.subplots(n_rows, per_class, figsize=(1.6 * per_class, 1.9 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    shown = 0
    for r, (name, idx) in enumerate([row for row in rows if row[1]]):
        for j, i in enumerate(idx):
            with Image.open(records.paths[i]) as im:
                axes[r, j].imshow(im.convert("RGB"))
            axes[r, j].set_title(f"{name}\n{rate[i]:.0%} → {records.classes[taken[i]]}", fontsize=7)
            shown += 1
    fig.suptitle("tiles the trained encoder's linear probe gets wrong most often (true class, error rate "
                 "→ taken for)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return shown


def format_table(result: dict) -> str:
    """Markdown: classifiers per encoder, the supervised rows, and the confusion matrix."""
    probe = result["settings"]["real_learning_linear"]
    lines = [f"| features | {probe} linear probe (real_learning) | logreg, C on val | RBF SVM, C on val |",
             "|---|---|---|---|"]
    for label, row in result["classifiers"].items():
        eva = row.get("eva_linear")
        eva_s = f"{eva:.3f}" if eva is not None else "–"
        lines.append(f"| {label} | {eva_s} | {row['logreg']['mean']:.3f} ± {row['logreg']['sd']:.3f} | "
                     f"{row['svm']['mean']:.3f} ± {row['svm']['sd']:.3f} |")
    if result["supervised"]:
        n = len(next(iter(result["supervised"].values()))["runs"])
        lines += ["", f"| ViT trained with the labels ({n} splits) | test balanced accuracy |", "|---|---|"]
        for start, row in result["supervised"].items():
            lines.append(f"| {start} | {row['mean']:.3f} ± {row['sd']:.3f} |")
    classes = result["classes"]
    e = result["errors"]
    lines += ["", "| true \\ predicted (trained, logreg) | " + " | ".join(classes) + " |",
              "|---|" + "---|" * len(classes)]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, e["confusion"])]
    lines += ["", f"{e['wrong_most_of_the_time']} of {e['tiles_tested']} tiles are wrong in more than half "
              f"of their test appearances, {e['always_wrong']} in all of them (pictured: hard_tiles.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the --out folder of a real_learning.py run")
    ap.add_argument("--supervised-splits", type=int, default=5,
                    help="splits to train the ViT with labels on (0: skip; ~1 CPU-minute each at 64 px)")
    ap.add_argument("--epochs", type=int, default=80, help="most epochs of supervised training")
    ap.add_argument("--patience", type=int, default=15, help="epochs without a better validation score")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the encoders embed and the supervised runs train")
    args = ap.parse_args(argv)
    run = read_run(args.out)
    s = run["settings"]
    import torch

    device = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and device != "cuda":
        raise SystemExit("error: --device cuda but CUDA is not available")
    from openpluto.embed.images import ImageRecords
    from openpluto.io import write_json_atomic, write_text_atomic
    from openpluto.train.config import load_train_config

    cfg = load_train_config(args.out / "run" / "config.yaml")
    records = ImageRecords.from_source(s["labelled"])
    y, n_classes = records.labels, len(records.classes)
    splits = rl.make_splits(y, s["splits"], s["val_fraction"], s["test_fraction"])
    encoders = rl.build_encoders(cfg, args.out / "model", s["random_seeds"], device)
    eva = run["summary"]["rows"]
    classifiers, predictions = {}, {}
    for label, enc in encoders.items():
        scores, predictions[label] = tuned_probes(rl.cls_features(enc, records, s["patch_size"], s["resize"]),
                                                  y, splits)
        classifiers[label] = {"eva_linear": eva.get(label, {}).get("linear", {}).get("mean"),
                              **{k: rl.mean_sd(v) for k, v in scores.items()}}
    errors = tile_errors(y, splits, predictions["trained"], n_classes)
    n_sup = min(args.supervised_splits, len(splits))
    supervised = {}
    if n_sup:
        runs = supervised_scores(cfg, encoders["trained"], records, splits[:n_sup], s["resize"],
                                 s["patch_size"], args.epochs, args.patience, device)
        supervised = {k: rl.mean_sd(v) for k, v in runs.items()}
    rate = errors["error_rate"]
    tested = ~np.isnan(rate)
    shown = hard_tiles_figure(records, errors, args.out / "hard_tiles.png")
    result = {
        "classes": records.classes,
        "classifiers": classifiers,
        "supervised": supervised,
        "errors": {"confusion": errors["confusion"].tolist(), "tiles_tested": int(tested.sum()),
                   "wrong_most_of_the_time": int((rate[tested] > 0.5).sum()),
                   "always_wrong": int((rate[tested] == 1.0).sum()), "pictured": shown,
                   "hardest": [{"path": records.paths[i], "error_rate": float(rate[i]),
                                "taken_for": records.classes[errors["taken_for"][i]]}
                               for i in np.nonzero(tested & (rate > 0.5))[0]]},
        "settings": {"real_learning_linear": s["linear"], "supervised_splits": n_sup,
                     "epochs": args.epochs, "patience": args.patience,
                     "supervised_lr": SUPERVISED_LR, "resize": s["resize"], "patch_size": s["patch_size"]},
    }
    write_json_atomic(args.out / "probe_bounds.json", result)
    table = format_table(result)
    write_text_atomic(args.out / "probe_bounds.md", table + "\n")
    print(table)
    print(f"(results in {args.out}/probe_bounds.json, picture {args.out}/hard_tiles.png)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

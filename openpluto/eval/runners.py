"""Protocol runners: config -> data -> runs -> results dict (what ``openpluto eval ...`` executes)."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np

from openpluto.errors import OpenPlutoError
from openpluto.eval.config import AbmilConfig, KnnConfig, LinearConfig, RegressionConfig, SegmentationConfig
from openpluto.eval.results import build_results
from openpluto.eval.runtime import cpu_threads
from openpluto.progress import progress

log = logging.getLogger(__name__)


def _task_name(task: str | None, source: str | None) -> str:
    if task:
        return task
    p = Path(source or "data")
    return p.stem if p.suffix else p.name


def run_linear(cfg: LinearConfig, encoder=None) -> dict:
    """eva linear probe, ``cfg.runs`` runs with seeds ``cfg.seed + i``."""
    from openpluto.eval.data import image_features
    from openpluto.eval.linear import linear_probe_settings, train_linear_probe

    t0 = time.perf_counter()
    fs = image_features(cfg, encoder)
    test = fs.part("test") if "test" in fs.splits else None
    runs = []
    with cpu_threads(1, cfg.device):
        for i in progress(range(cfg.runs), desc="linear probe runs", leave=False):
            runs.append(
                train_linear_probe(
                    fs.part("train"), fs.part("val"), test, len(fs.classes), cfg.seed + i,
                    **linear_probe_settings(cfg), device=cfg.device,
                )
            )
    data = {**fs.info, "evaluated_on": fs.eval_split()}
    return build_results(
        "linear",
        cfg,
        _task_name(cfg.task, cfg.data or cfg.features),
        fs.encoder,
        data,
        runs,
        ["balanced_accuracy", "accuracy", "macro_f1", "val_balanced_accuracy"],
        "balanced_accuracy",
        time.perf_counter() - t0,
    )


def run_knn(cfg: KnnConfig, encoder=None) -> dict:
    """DINO weighted kNN (deterministic: one run)."""
    from openpluto.eval.data import image_features
    from openpluto.eval.knn import knn_predict
    from openpluto.eval.metrics import balanced_accuracy, macro_f1

    t0 = time.perf_counter()
    fs = image_features(cfg, encoder)
    split = fs.eval_split()
    xq, yq = fs.part(split)
    xt, yt = fs.part("train")
    with cpu_threads(1, cfg.device):
        pred = knn_predict(xt, yt, xq, len(fs.classes), cfg.k, cfg.temperature, device=cfg.device).argmax(1)
    runs = [
        {
            "balanced_accuracy": balanced_accuracy(yq, pred),
            "accuracy": float((pred == yq).mean()),
            "macro_f1": macro_f1(yq, pred, len(fs.classes)),
        }
    ]
    data = {**fs.info, "evaluated_on": split}
    return build_results(
        "knn",
        cfg,
        _task_name(cfg.task, cfg.data or cfg.features),
        fs.encoder,
        data,
        runs,
        ["balanced_accuracy", "accuracy", "macro_f1"],
        "balanced_accuracy",
        time.perf_counter() - t0,
    )


def run_abmil(cfg: AbmilConfig) -> dict:
    import h5py

    from openpluto.eval.abmil import load_bags, read_slide_labels, train_abmil
    from openpluto.eval.data import require_classes, split_counts, stratified_split
    from openpluto.io import sha256_file

    if not cfg.features or not cfg.labels:
        raise OpenPlutoError("give --features DIR_OF_H5 and --labels CSV (slide,label,split)")
    t0 = time.perf_counter()
    rows = read_slide_labels(cfg.labels)
    slides = [r["slide"] for r in rows]
    classes = sorted({r["label"] for r in rows})
    labels = np.array([classes.index(r["label"]) for r in rows])
    require_classes(classes, labels, cfg.labels)
    if "split" in rows[0]:
        from openpluto.embed.images import normalise_split

        splits = [normalise_split(r["split"], f"{cfg.labels} slide {r['slide']}") for r in rows]
        split_info = {"split": "given"}
    else:
        splits = stratified_split(labels, 0.15, 0.15, cfg.seed)
        split_info = {"split": "made", "split_seed": cfg.seed, "val_fraction": 0.15, "test_fraction": 0.15}
    if "train" not in splits or "val" not in splits:
        raise OpenPlutoError(f"{cfg.labels}: needs train and val slides (found {sorted(set(splits))})")
    bags = load_bags(cfg.features, slides)
    first = Path(cfg.features) / f"{slides[0]}.h5"
    with h5py.File(first, "r") as f:
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    runs = []
    for i in progress(range(cfg.runs), desc="ABMIL runs", leave=False):
        runs.append(
            train_abmil(
                bags,
                labels,
                splits,
                len(classes),
                cfg.seed + i,
                cfg.projected_dim,
                cfg.attention_dim,
                tuple(cfg.mlp_dims),
                cfg.dropout,
                cfg.lr,
                cfg.weight_decay,
                cfg.batch_size,
                cfg.max_epochs,
                cfg.patience,
                cfg.max_tiles,
                cfg.device,
            )
        )
    import hashlib

    fp = hashlib.sha256()
    fp.update(sha256_file(cfg.labels).encode())
    for s, b in zip(slides, bags):
        fp.update(f"{s}\t{b.shape}\t{float(np.float64(b.sum())):.6e}\n".encode())
    encoder = {
        "spec": str(attrs.get("model", "")),
        "name": str(attrs.get("model", "")),
        "weights_hash": str(attrs.get("weights_hash", "")),
        "label": str(attrs.get("model", Path(cfg.features).name)),
    }
    data = {
        "features": str(cfg.features),
        "labels": str(cfg.labels),
        "fingerprint": fp.hexdigest(),
        "classes": classes,
        "n_per_split": split_counts(splits),
        "feature_dim": int(bags[0].shape[1]),
        "tiles_per_slide_mean": float(np.mean([len(b) for b in bags])),
        **split_info,
        "evaluated_on": "test" if "test" in splits else "val",
        "feature_attrs": {k: str(v) for k, v in attrs.items()},
    }
    return build_results(
        "abmil",
        cfg,
        _task_name(cfg.task, cfg.labels),
        encoder,
        data,
        runs,
        ["balanced_accuracy", "macro_f1", "accuracy", "val_balanced_accuracy"],
        "balanced_accuracy",
        time.perf_counter() - t0,
    )


def run_segmentation(cfg: SegmentationConfig, encoder=None) -> dict:
    import hashlib

    import torch

    from openpluto.eval.data import encoder_info, load_encoder_seeded
    from openpluto.eval.segmentation import (
        load_segmentation_split,
        normalised_images,
        token_maps,
        train_segmentation,
    )

    if not cfg.model or not cfg.data:
        raise OpenPlutoError("give --model and --data ROOT (ROOT/{train,val,test}/{images,masks}/)")
    t0 = time.perf_counter()
    root = Path(cfg.data)
    if not root.is_dir():
        raise OpenPlutoError(f"{root}: segmentation data folder does not exist")
    parts = {s: load_segmentation_split(root, s, cfg.image_size) for s in ("train", "val", "test")}
    if parts["train"] is None or parts["val"] is None:
        raise OpenPlutoError(f"{root}: needs train/ and val/ (each with images/ and masks/)")
    if encoder is None:
        encoder = load_encoder_seeded(cfg.model, cfg.device, compile=cfg.compile)
    enc = encoder_info(encoder, cfg.model)
    patch = cfg.patch_size or getattr(encoder, "default_patch_size", None)
    h, w = parts["train"].images.shape[1:3]
    if patch and (h % patch or w % patch):
        raise OpenPlutoError(
            f"{root}: image size {h}x{w} is not divisible by patch size {patch}; "
            f"pass --image-size (e.g. {max(patch, (h // patch) * patch)})"
        )
    num_classes = cfg.num_classes or int(max(p.masks.max() for p in parts.values() if p is not None)) + 1
    fp = hashlib.sha256()
    tensors = {}
    for s, p in parts.items():
        if p is None:
            continue
        if p.masks.max() >= num_classes or p.masks.min() < 0:
            raise OpenPlutoError(f"{root / s}/masks: class ids must be in 0..{num_classes - 1}")
        fp.update(hashlib.sha256(p.images.tobytes()).digest() + hashlib.sha256(p.masks.tobytes()).digest())
        tensors[s] = (
            token_maps(encoder, p.images, cfg.patch_size, cfg.batch_size_embed, cfg.device),
            normalised_images(p.images, encoder.mean, encoder.std),
            torch.from_numpy(p.masks),
        )
    runs = []
    for i in progress(range(cfg.runs), desc="segmentation runs", leave=False):
        runs.append(
            train_segmentation(
                tensors["train"],
                tensors["val"],
                tensors.get("test"),
                num_classes,
                cfg.seed + i,
                cfg.lr,
                cfg.weight_decay,
                cfg.batch_size,
                cfg.max_steps,
                cfg.val_every,
                cfg.device,
            )
        )
    data = {
        "source": str(root),
        "fingerprint": fp.hexdigest(),
        "num_classes": num_classes,
        "n_per_split": {s: len(p.names) for s, p in parts.items() if p is not None},
        "image_size": [int(h), int(w)],
        "patch_size": patch,
        "token_grid": list(tensors["train"][0].shape[-2:]),
        "evaluated_on": "test" if parts["test"] is not None else "val",
    }
    return build_results(
        "segmentation",
        cfg,
        _task_name(cfg.task, cfg.data),
        enc,
        data,
        runs,
        ["dice", "val_dice"],
        "dice",
        time.perf_counter() - t0,
    )


def read_regression_data(cfg: RegressionConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], dict]:
    """(features [N, D], targets [N, T] raw, folds [N], target names, info) with rows matched by id
    (h5 ``ids`` or ``paths`` against the CSV ``id_column``) or, without ids, by row order."""
    import h5py

    fpath, tpath = Path(cfg.features), Path(cfg.targets)
    if not fpath.is_file():
        raise OpenPlutoError(f"{fpath}: features file does not exist")
    if not tpath.is_file():
        raise OpenPlutoError(f"{tpath}: targets CSV does not exist")
    with h5py.File(fpath, "r") as f:
        if "features" not in f:
            raise OpenPlutoError(f"{fpath}: no 'features' dataset")
        feats = f["features"][()].astype(np.float32)
        key = "ids" if "ids" in f else ("paths" if "paths" in f else None)
        ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f[key][()]] if key else None
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    with open(tpath, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        rows = list(reader)
    if cfg.fold_column not in cols:
        raise OpenPlutoError(f"{tpath}: no fold column '{cfg.fold_column}' (set --fold-column)")
    has_id = cfg.id_column in cols
    targets = list(cfg.target_columns) or [c for c in cols if c not in (cfg.id_column, cfg.fold_column)]
    missing = [c for c in targets if c not in cols]
    if missing or not targets:
        raise OpenPlutoError(f"{tpath}: target column(s) {missing or 'none'} not found")
    if ids is not None and has_id:
        index = {s: i for i, s in enumerate(ids)}
        index.update({Path(s).stem: i for i, s in enumerate(ids) if Path(s).stem not in index})
        order = []
        for r in rows:
            if r[cfg.id_column] not in index:
                raise OpenPlutoError(f"{tpath}: id '{r[cfg.id_column]}' is not in {fpath} ({key})")
            order.append(index[r[cfg.id_column]])
        feats = feats[order]
        matching = f"by id ({cfg.id_column} -> h5 {key})"
    else:
        if len(rows) != len(feats):
            raise OpenPlutoError(
                f"{tpath}: {len(rows)} rows but {fpath} has {len(feats)} feature rows "
                "(rows match by order when there are no ids)"
            )
        matching = "by row order"
    try:
        y = np.array([[float(r[c]) for c in targets] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise OpenPlutoError(f"{tpath}: non-numeric target value ({e})") from None
    folds = np.array([r[cfg.fold_column] for r in rows])
    info = {"row_matching": matching, "feature_attrs": {k: str(v) for k, v in attrs.items()}}
    return feats, y, folds, targets, info


def run_regression(cfg: RegressionConfig) -> dict:
    from openpluto.eval.regression import ridge_fold
    from openpluto.io import sha256_file

    if not cfg.features or not cfg.targets:
        raise OpenPlutoError("give --features FILE.h5 and --targets CSV")
    t0 = time.perf_counter()
    x, y, folds, names, info = read_regression_data(cfg)
    fold_ids = sorted(set(folds.tolist()))
    if len(fold_ids) < 2:
        raise OpenPlutoError(f"{cfg.targets}: needs at least 2 folds in '{cfg.fold_column}'")
    runs = []
    for f in fold_ids:
        te = folds == f
        r = ridge_fold(
            x[~te], y[~te], x[te], y[te], cfg.n_components, cfg.alpha_numerator, cfg.log1p, cfg.seed
        )
        runs.append({"fold": f, **r})
    attrs = info["feature_attrs"]
    encoder = {
        "spec": attrs.get("model", ""),
        "name": attrs.get("model", ""),
        "weights_hash": attrs.get("weights_hash", ""),
        "label": attrs.get("model_label", attrs.get("model", Path(cfg.features).stem)),
    }
    data = {
        "features": str(cfg.features),
        "targets": str(cfg.targets),
        "fingerprint": sha256_file(cfg.features)[:32] + sha256_file(cfg.targets)[:32],
        "n_rows": int(len(x)),
        "feature_dim": int(x.shape[1]),
        "target_names": names,
        "folds": fold_ids,
        **info,
    }
    return build_results(
        "regression",
        cfg,
        _task_name(cfg.task, cfg.targets),
        encoder,
        data,
        runs,
        ["pearson_mean"],
        "pearson_mean",
        time.perf_counter() - t0,
    )

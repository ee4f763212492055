"""Evaluation data: splits, encoders and frozen image features computed once and cached.

The cache key is sha256 over (encoder name + weights hash, data fingerprint, patch size, pooling,
resize, openpluto version); a cached file is the same HDF5 layout ``openpluto embed-images`` writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from openpluto.errors import OpenPlutoError

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Frozen features with labels and a train/val/test split.

    ``features`` float32 [N, D]; ``labels`` int64 [N]; ``splits`` list of train/val/test.
    ``info`` describes the data (source, fingerprint, split provenance, class names, counts).
    """

    features: np.ndarray
    labels: np.ndarray
    splits: list[str]
    classes: list[str]
    info: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)

    def part(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        m = np.array([s == split for s in self.splits])
        return self.features[m], self.labels[m]

    def eval_split(self) -> str:
        """``test`` when there is a test split, else ``val``."""
        return "test" if "test" in self.splits else "val"


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Seeded per-class split into train/val/test; every class with >= 3 items lands in all three.

    Within each class the items are shuffled with ``seed`` and cut at ``round(n*test)``,
    ``round(n*val)`` (at least 1 each when the fraction is > 0 and the class has >= 3 items).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise OpenPlutoError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be < 1")
    rng = np.random.default_rng(seed)
    out = np.array(["train"] * len(labels), dtype=object)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = min(n_test, max(n - 1, 0))
        n_val = min(n_val, max(n - 1 - n_test, 0))
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
    return [str(s) for s in out]


def require_classes(classes, labels, source) -> None:
    """Refuse a classification task with fewer than 2 classes: it can only ever score 1.0."""
    present = sorted({str(classes[int(i)]) for i in labels}) if len(labels) else []
    if len(present) < 2:
        found = f"only class {present[0]!r}" if present else "no labelled items"
        raise OpenPlutoError(
            f"{source}: {found}; a classifier needs at least 2 classes (one folder or label per class)"
        )


def ensure_split(records, val_fraction: float, test_fraction: float, seed: int) -> tuple[object, dict]:
    """Records with a split (a seeded stratified one made if the source has none) + provenance dict.

    Refuses fewer than 2 classes (one line naming the source)."""
    require_classes(records.classes, records.labels, records.source)
    if records.has_split:
        info = {"split": "given"}
    elif any(records.splits):
        raise OpenPlutoError(f"{records.source}: some rows have a split and some not; give all or none")
    else:
        records.splits = stratified_split(records.labels, val_fraction, test_fraction, seed)
        info = {
            "split": "made",
            "split_seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
        }
    if "train" not in records.splits or "val" not in records.splits:
        raise OpenPlutoError(
            f"{records.source}: needs train and val images (found splits "
            f"{sorted(set(records.splits))}); add a val/ folder or split column"
        )
    return records, info


def split_counts(splits: list[str]) -> dict[str, int]:
    return {s: int(sum(x == s for x in splits)) for s in ("train", "val", "test") if s in splits}


def load_encoder_seeded(spec: str, device: str = "cpu", seed: int = 0, compile: bool = False):
    """``openpluto.model.load_encoder`` with torch seeded first, so preset (random-init) encoders are
    the same on every run; ``compile``: its blocks compiled (``openpluto.model.maybe_compile``)."""
    import torch

    try:
        from openpluto.model import load_encoder, maybe_compile
    except ImportError as e:  # pragma: no cover - only while the model package is missing
        raise OpenPlutoError(f"openpluto.model.load_encoder is not available ({e})") from None
    torch.manual_seed(seed)
    return maybe_compile(load_encoder(spec, device=device), compile)


def encoder_info(encoder, spec: str) -> dict:
    """What identifies an encoder in results: spec, name, weights hash and a short table label."""
    name = str(getattr(encoder, "name", spec))
    whash = str(getattr(encoder, "weights_hash", "unknown"))
    p = Path(spec)
    if spec.startswith("timm:"):
        label = spec.split(":")[1]
    elif p.exists():
        label = p.name
    else:
        label = spec
    if whash == "random-init":
        label = f"{label} (random init)" if "random" not in label else label
    return {"spec": spec, "name": name, "weights_hash": whash, "label": label}


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPENPLUTO_CACHE", Path.home() / ".cache" / "openpluto")) / "features"


def feature_cache_key(encoder_id: dict, fingerprint: str, patch_size, pooling: str, resize: int) -> str:
    from openpluto import __version__

    blob = json.dumps(
        {
            "encoder": encoder_id.get("name"),
            "weights": encoder_id.get("weights_hash"),
            "data": fingerprint,
            "patch_size": patch_size,
            "pooling": pooling,
            "resize": resize,
            "openpluto": __version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def image_features(cfg, encoder=None) -> FeatureSet:
    """Features for linear/kNN from ``cfg`` (an ``EmbedSettings``): either ``cfg.features`` (an
    ``embed-images`` file) or ``cfg.model`` + ``cfg.data`` (embedded once, then read from the cache)."""
    from openpluto.embed.images import (
        ImageRecords,
        embed_images,
        load_image_features,
        save_image_features,
    )

    if cfg.features:
        feats, records, attrs = load_image_features(cfg.features)
        records.source = records.source or str(cfg.features)
        records, split_info = ensure_split(records, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        enc = {
            "spec": str(attrs.get("model", "")),
            "name": str(attrs.get("model", "")),
            "weights_hash": str(attrs.get("weights_hash", "")),
            "label": str(attrs.get("model_label", attrs.get("model", Path(cfg.features).stem))),
        }
        info = {
            "source": str(cfg.features),
            "fingerprint": str(attrs.get("fingerprint", "")),
            "features_file": str(cfg.features),
            "patch_size": attrs.get("patch_size"),
            "pooling": attrs.get("pooling"),
            "resize": attrs.get("resize"),
            **split_info,
        }
        return _featureset(feats, records, info, enc)

    if not cfg.model or not cfg.data:
        raise OpenPlutoError("give --model and --data (or --features FILE.h5 from `openpluto embed-images`)")
    records = ImageRecords.from_source(cfg.data)
    files_fingerprint = records.fingerprint()  # before any made split: the cache is split-independent
    records, split_info = ensure_split(records, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    if encoder is None:
        encoder = load_encoder_seeded(cfg.model, cfg.device, compile=cfg.compile)
    enc = encoder_info(encoder, cfg.model)
    fingerprint = records.fingerprint()
    key = feature_cache_key(enc, files_fingerprint, cfg.patch_size, cfg.pooling, cfg.resize)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache_file = cache / f"{key}.h5"
    info = {
        "source": str(cfg.data),
        "fingerprint": fingerprint,
        "cache_file": str(cache_file),
        "patch_size": cfg.patch_size,
        "pooling": cfg.pooling,
        "resize": cfg.resize,
        **split_info,
    }
    if cache_file.is_file():
        feats, cached, _ = load_image_features(cache_file)
        if cached.paths == records.paths:
            log.info("features from cache %s", cache_file)
            info["cache_hit"] = True
            return _featureset(feats, records, info, enc)
    errors: list[tuple[str, str]] = []
    feats, labels, paths, splits = embed_images(
        encoder,
        records,
        cfg.patch_size,
        cfg.pooling,
        cfg.batch_size_embed,
        cfg.workers,
        cfg.resize,
        errors=errors,
    )
    if errors:
        for p, e in errors:
            log.warning("skipped %s: %s", p, e)
        info["skipped_images"] = [p for p, _ in errors]
        keep = [i for i, p in enumerate(records.paths) if p not in {q for q, _ in errors}]
        records = records.subset(keep)
    else:
        save_image_features(
            cache_file,
            feats,
            records,
            {
                "model": enc["name"],
                "model_label": enc["label"],
                "weights_hash": enc["weights_hash"],
                "fingerprint": fingerprint,
                "patch_size": cfg.patch_size or 0,
                "pooling": cfg.pooling,
                "resize": cfg.resize,
                "source": str(cfg.data),
            },
        )
    info["cache_hit"] = False
    return _featureset(feats, records, info, enc)


def _featureset(feats: np.ndarray, records, info: dict, enc: dict) -> FeatureSet:
    info = {
        **info,
        "classes": list(records.classes),
        "n_per_split": split_counts(records.splits),
        "feature_dim": int(feats.shape[1]),
    }
    return FeatureSet(feats, records.labels, list(records.splits), list(records.classes), info, enc)

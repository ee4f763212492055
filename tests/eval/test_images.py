"""Image records, eva preprocessing, embed_images, splits and the feature cache."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from _eval_utils import TinyEncoder, write_colour_dataset
from PIL import Image

from openpluto.embed.images import (
    ImageRecords,
    embed_images,
    load_image,
    load_image_features,
    save_image_features,
)
from openpluto.errors import OpenPlutoError
from openpluto.eval.data import ensure_split, image_features, stratified_split


def test_records_from_split_folders_flat_folders_and_csv(tmp_path):
    rec = ImageRecords.from_source(write_colour_dataset(tmp_path / "a", 2))
    assert len(rec) == 18 and rec.classes == ["blue", "green", "red"] and rec.has_split
    assert sorted(set(rec.splits)) == ["test", "train", "val"]
    assert all(Path(p).parent.name == rec.classes[lab] for p, lab in zip(rec.paths, rec.labels))

    flat = ImageRecords.from_source(write_colour_dataset(tmp_path / "b", 3, splits=None))
    assert len(flat) == 9 and not flat.has_split and set(flat.splits) == {""}

    csv_path = tmp_path / "list.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for p, lab in zip(flat.paths, flat.labels):
            w.writerow(
                [Path(p).relative_to(tmp_path), flat.classes[lab], "validation" if "_0" in p else "train"]
            )
    from_csv = ImageRecords.from_source(csv_path)
    assert from_csv.paths == flat.paths and from_csv.splits.count("val") == 3


def test_records_errors_are_one_line(tmp_path):
    with pytest.raises(OpenPlutoError, match="no images found"):
        ImageRecords.from_source(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,a\n")
    with pytest.raises(OpenPlutoError, match="path,label"):
        ImageRecords.from_source(bad)
    bad.write_text("path,label\nmissing.png,a\n")
    with pytest.raises(OpenPlutoError, match="line 2: image .*missing.png does not exist"):
        ImageRecords.from_source(bad)


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 50:150] = 255  # the centre 100 columns are white
    Image.fromarray(arr).save(tmp_path / "x.png")
    out = load_image(str(tmp_path / "x.png"), 50)
    assert out.shape == (50, 50, 3)
    assert out[:, 1:-1].min() >= 250 and out.mean() > 245  # the crop is the white centre (edges antialiased)


def test_embed_images_matches_encoder_and_skips_bad_files(tmp_path, encoder):
    root = write_colour_dataset(tmp_path / "d", 2, splits=None, size=32)
    (root / "red" / "broken.png").write_bytes(b"not a png")
    rec = ImageRecords.from_source(root)
    with pytest.raises(OpenPlutoError, match="broken.png"):
        embed_images(encoder, rec, resize=32, progress=False)
    errors = []
    feats, labels, paths, splits = embed_images(
        encoder, rec, resize=32, batch_size=4, progress=False, errors=errors
    )
    assert len(errors) == 1 and feats.shape == (6, 12) and feats.dtype == np.float32
    assert len(labels) == len(paths) == len(splits) == 6
    x = torch.from_numpy(load_image(paths[0], 32)).permute(2, 0, 1)[None].float() / 255
    x = (x - 0.5) / 0.25
    assert np.allclose(feats[0], encoder.embed(x)[0].detach().numpy(), atol=1e-5)
    both, *_ = embed_images(encoder, rec.subset([0, 1]), pooling="cls+mean", resize=32, progress=False)
    assert both.shape == (2, 24)


def test_stratified_split_is_seeded_and_covers_every_class():
    labels = np.repeat([0, 1, 2], [10, 4, 3])
    a = stratified_split(labels, 0.2, 0.2, seed=0)
    assert a == stratified_split(labels, 0.2, 0.2, seed=0)
    assert a != stratified_split(labels, 0.2, 0.2, seed=1)
    for c in range(3):
        assert {s for s, lab in zip(a, labels) if lab == c} == {"train", "val", "test"}
    assert a.count("test") == 2 + 1 + 1


def test_ensure_split_records_provenance(tmp_path):
    rec = ImageRecords.from_source(write_colour_dataset(tmp_path, 5, splits=None))
    rec, info = ensure_split(rec, 0.2, 0.2, seed=3)
    assert info == {"split": "made", "split_seed": 3, "val_fraction": 0.2, "test_fraction": 0.2}
    assert rec.has_split


def test_feature_cache_hit_and_fingerprint(tmp_path, encoder):
    from openpluto.eval.config import LinearConfig

    root = write_colour_dataset(tmp_path / "d", 3, size=32)
    cfg = LinearConfig(model="standin", data=str(root), resize=32, cache_dir=str(tmp_path / "cache"))
    first = image_features(cfg, encoder)
    assert first.info["cache_hit"] is False and len(list((tmp_path / "cache").glob("*.h5"))) == 1
    second = image_features(cfg, encoder)
    assert second.info["cache_hit"] is True
    assert np.array_equal(first.features, second.features)
    # another encoder (different weights hash) must not reuse the cache
    other = TinyEncoder(seed=1)
    other.weights_hash = "def456"
    third = image_features(cfg, other)
    assert third.info["cache_hit"] is False and not np.allclose(third.features, first.features)
    # the fingerprint changes when a file changes size
    fp = ImageRecords.from_source(root).fingerprint()
    p = next((root / "train" / "red").iterdir())
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(p)
    assert ImageRecords.from_source(root).fingerprint() != fp


def test_features_file_roundtrip(tmp_path, encoder):
    rec = ImageRecords.from_source(write_colour_dataset(tmp_path / "d", 2, size=32))
    feats, *_ = embed_images(encoder, rec, resize=32, progress=False)
    save_image_features(
        tmp_path / "f.h5", feats, rec, {"model": "tiny", "weights_hash": "h", "patch_size": 8}
    )
    f2, rec2, attrs = load_image_features(tmp_path / "f.h5")
    assert np.array_equal(f2, feats) and rec2.paths == rec.paths and rec2.splits == rec.splits
    assert rec2.classes == rec.classes and attrs["model"] == "tiny" and attrs["patch_size"] == 8

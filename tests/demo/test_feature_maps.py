"""Feature maps against the ground truth: crop choice, token labels and the numbers that separate encoders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from openpluto.demo.feature_maps import (
    Crop,
    class_variance_share,
    cross_slide_knn,
    pick_crop,
    token_labels,
)
from openpluto.demo.synthetic import SyntheticTruth


def _truth(class_map: np.ndarray, downsample: float = 4.0) -> SyntheticTruth:
    h, w = class_map.shape
    none = np.zeros_like(class_map, dtype=bool)
    return SyntheticTruth(Path("s.tiff"), ("a", "b", "c", "d"), downsample, 0.5, (int(w * downsample),
                          int(h * downsample)), class_map.astype(np.int8), none, none.copy(), none.copy())


def test_pick_crop_finds_the_corner_where_four_classes_meet():
    cm = np.full((64, 64), -1, np.int8)
    cm[8:56, 8:56] = 0  # one class, except a 4-class corner around (40, 40)
    cm[30:40, 40:56] = 1
    cm[40:56, 30:40] = 2
    cm[40:56, 40:56] = 3
    crop = pick_crop(_truth(cm), size_l0=4 * 20)
    assert crop is not None and crop.n_classes == 4
    assert 20 * 4 <= crop.x <= 40 * 4 and 20 * 4 <= crop.y <= 40 * 4
    assert pick_crop(_truth(np.full((64, 64), -1, np.int8)), size_l0=80) is None  # no tissue, no crop


def test_token_labels_take_the_majority_and_leave_mixed_tokens_out():
    cm = np.zeros((16, 16), np.int8)
    cm[:, 8:] = 1
    cm[:, 7] = -1  # a background column inside the left tokens
    labels = token_labels(_truth(cm, 1.0), Crop(Path("s.tiff"), 0, 0, 16, 2), (4, 4))
    assert (labels[:, 0] == 0).all() and (labels[:, 2:] == 1).all()
    assert (labels[:, 1] == 0).all()  # 3 of 4 columns class 0: majority above 60%
    mixed = token_labels(_truth(cm, 1.0), Crop(Path("s.tiff"), 4, 0, 8, 2), (2, 1))
    assert (mixed == -1).all()  # half class 0 / background / class 1: no label


def test_numbers_separate_class_features_from_noise():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 3, 300) for _ in range(3)]
    centres = rng.normal(size=(3, 16)) * 3
    following = [centres[y] + rng.normal(size=(len(y), 16)) for y in labels]
    noise = [rng.normal(size=(len(y), 16)) for y in labels]
    assert class_variance_share(np.concatenate(following), np.concatenate(labels)) > 0.8
    assert class_variance_share(np.concatenate(noise), np.concatenate(labels)) < 0.05
    assert cross_slide_knn(following, labels, 3) > 0.95
    assert abs(cross_slide_knn(noise, labels, 3) - 1 / 3) < 0.1
    assert math.isclose(class_variance_share(np.eye(3)[np.arange(30) % 3], np.arange(30) % 3), 1.0)

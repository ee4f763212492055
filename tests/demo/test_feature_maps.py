"""Feature maps against the ground truth: crop choice, window labels, the number that separates encoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openpluto.demo.feature_maps import cross_slide_knn, pick_crop, window_label, windows
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


def test_windows_and_their_labels_come_from_the_centre():
    cm = np.zeros((16, 16), np.int8)
    cm[:, 8:] = 1
    cm[:, 7] = -1  # a background column
    truth = _truth(cm, 1.0)
    assert window_label(truth, 0, 0, 8) == 0  # centre columns 2..5: all class 0
    assert window_label(truth, 8, 0, 8) == 1
    assert window_label(truth, 4, 0, 8) == -1  # centre columns 6..9: half background/class 1
    assert window_label(truth, 2, 0, 8) == 0  # centre 4..7: 3 of 4 class 0 (>= 60%)
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    wins, grid = windows(image, 4, 3)
    assert grid == (3, 3) and wins.shape == (9, 4, 4, 3)
    np.testing.assert_array_equal(wins[4], image[3:7, 3:7])


def test_cross_slide_knn_separates_class_features_from_noise():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 3, 300) for _ in range(3)]
    centres = rng.normal(size=(3, 16)) * 3
    following = [centres[y] + rng.normal(size=(len(y), 16)) for y in labels]
    noise = [rng.normal(size=(len(y), 16)) for y in labels]
    assert cross_slide_knn(following, labels, 3) > 0.95
    assert abs(cross_slide_knn(noise, labels, 3) - 1 / 3) < 0.1

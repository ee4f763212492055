"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from openpluto.eval.metrics import (
    balanced_accuracy,
    dice_per_image,
    macro_f1,
    mean_dice,
    mean_std,
    pearson_per_column,
    reduce_dice,
)


def test_balanced_accuracy_and_macro_f1_hand_case():
    y = np.array([0, 0, 0, 1])
    p = np.array([0, 0, 1, 1])
    # recall: class 0 = 2/3, class 1 = 1/1
    assert balanced_accuracy(y, p) == pytest.approx((2 / 3 + 1) / 2)
    # F1: class 0: P=1, R=2/3 -> 0.8; class 1: P=1/2, R=1 -> 2/3
    assert macro_f1(y, p) == pytest.approx((0.8 + 2 / 3) / 2)
    # a class never predicted nor present still counts as F1 = 0 when num_classes is given
    assert macro_f1(y, p, num_classes=3) == pytest.approx((0.8 + 2 / 3) / 3)


@pytest.mark.filterwarnings("ignore:y_pred contains classes")
def test_balanced_accuracy_matches_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))


def test_dice_monai_semantics_hand_case():
    # image 0: class 1 GT 4 px, pred 2 of them + 2 wrong px -> 2*2/(4+4) = 0.5;
    #          class 2 absent from GT but predicted -> ignored (NaN)
    # image 1: class 1 GT 2 px, pred exactly -> 1.0; class 2 GT 2 px, pred 0 -> 0.0
    gt = torch.zeros(2, 4, 4, dtype=torch.long)
    pr = torch.zeros(2, 4, 4, dtype=torch.long)
    gt[0, 0, :4] = 1
    pr[0, 0, :2] = 1
    pr[0, 1, :2] = 1
    pr[0, 3, 3] = 2
    gt[1, 0, :2] = 1
    pr[1, 0, :2] = 1
    gt[1, 2, :2] = 2
    d = dice_per_image(pr, gt, num_classes=3)
    assert d[0, 0].item() == pytest.approx(0.5)
    assert math.isnan(d[0, 1].item())
    assert d[1].tolist() == pytest.approx([1.0, 0.0])
    # MONAI mean: per image over valid classes (0.5; 0.5), then over images -> 0.5
    assert mean_dice(pr, gt, 3) == pytest.approx(0.5)
    # background is excluded: a perfect background with no foreground anywhere gives NaN, not 1
    assert math.isnan(
        mean_dice(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), 3)
    )


def test_reduce_dice_skips_images_without_foreground():
    per = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [0.0, 0.5]], dtype=torch.float64)
    assert reduce_dice(per) == pytest.approx((1.0 + 0.25) / 2)


def test_pearson_hand_case_and_constant_column():
    y = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    p = np.array([[2.0, 1.0], [4.0, 2.0], [7.0, 3.0]])
    r = pearson_per_column(y, p)
    # centred: a = (-1, 0, 1), b = (-7/3, -1/3, 8/3); sum ab = 5, sum a^2 = 2, sum b^2 = 114/9
    assert r[0] == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert math.isnan(r[1])


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([0.7]) == (0.7, 0.0)
    assert mean_std([1.0, float("nan"), 3.0])[0] == pytest.approx(2.0)

"""Metrics of the protocols: balanced accuracy, macro-F1, Dice (MONAI semantics), Pearson r."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (= scikit-learn's
    ``balanced_accuracy_score``, without its input-validation cost: it runs at every validation)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return float("nan")
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in np.unique(y_true)]))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over ``range(num_classes)`` (or the classes seen)."""
    labels = list(range(num_classes)) if num_classes else None
    return float(
        f1_score(np.asarray(y_true), np.asarray(y_pred), labels=labels, average="macro", zero_division=0)
    )


def dice_per_image(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of each image and foreground class: ``[B, C-1]``, NaN where the class is absent from
    the ground truth (MONAI ``DiceMetric(include_background=False, ignore_empty=True)``).

    pred, target: integer class maps ``[B, H, W]``; class 0 is background.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and mask {tuple(target.shape)} differ in shape")
    classes = torch.arange(1, num_classes, device=pred.device).view(1, -1, 1, 1)
    p = pred.unsqueeze(1) == classes  # [B, C-1, H, W]
    g = target.unsqueeze(1) == classes
    inter = (p & g).flatten(2).sum(-1).double()
    denom = p.flatten(2).sum(-1).double() + g.flatten(2).sum(-1).double()
    gt_present = g.flatten(2).any(-1)
    dice = 2.0 * inter / denom.clamp_min(1)
    return torch.where(gt_present, dice, torch.full_like(dice, float("nan")))


def reduce_dice(per_image: torch.Tensor) -> float:
    """MONAI's ``reduction="mean"``: mean over non-NaN classes per image, then over images that
    have any non-NaN class. NaN when no image has any foreground."""
    valid = ~torch.isnan(per_image)
    per_img_sum = torch.where(valid, per_image, torch.zeros_like(per_image)).sum(1)
    n = valid.sum(1)
    has = n > 0
    if not bool(has.any()):
        return float("nan")
    return float((per_img_sum[has] / n[has]).mean())


def mean_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean Dice excluding background and classes empty in the ground truth (see ``dice_per_image``)."""
    return reduce_dice(dice_per_image(pred, target, num_classes))


def pearson_per_column(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column ``[T]`` of ``[N, T]`` arrays; NaN where either column is constant."""
    a = np.asarray(y_true, np.float64)
    b = np.asarray(y_pred, np.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = (a * b).sum(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den == 0] = np.nan
    return r


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), ignoring NaN."""
    v = np.asarray([x for x in values if x == x], np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0

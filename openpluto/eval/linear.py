"""eva's linear probe: one linear layer on frozen embeddings, early stopping on validation balanced
accuracy, best checkpoint reported on the test split (validation when there is no test).

What eva 0.4.5 does with its patch-classification configs, and openpluto with the defaults of
:class:`~openpluto.eval.config.LinearConfig`: AdamW (lr 3e-4, torch's default weight decay 0.01),
batch 256, at most 12,500 steps; the lr runs at 1/3 for the first 5 epochs (the ``ConstantLR`` that
eva's ``HeadModule`` uses when a config names no scheduler); validation after every epoch (one pass
over the training set); patience counted in epochs, 20% of the maximum number of epochs; one logit
and binary cross-entropy for two classes, cross-entropy over C logits otherwise.

One addition: on small validation sets one lucky epoch can win the whole run (an early spike that
is never beaten stops training with a barely trained head), so the score that picks the checkpoint
and drives early stopping is the mean validation balanced accuracy over the last ``smooth`` epochs
(``LinearConfig`` default 5; ``smooth=1`` is eva's rule exactly). On LC25000 lung (450 tiles, 10
stratified 60/20/20 splits, a random-init ``cpu-tiny`` encoder) eva's rule gave 0.809 ± 0.064 (worst
split 0.667) and a mean over 5 epochs 0.833 ± 0.039 (worst 0.778).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from openpluto.eval.metrics import balanced_accuracy, macro_f1


def _predict(head: nn.Module, x: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    """Class ids [N]: argmax of C logits, or logit > 0 for a single binary logit."""
    with torch.no_grad():
        out = []
        for i in range(0, len(x), chunk):
            logits = head(x[i : i + chunk])
            out.append(logits.argmax(1) if logits.shape[1] > 1 else (logits[:, 0] > 0).long())
        return torch.cat(out).cpu().numpy()


def _loss_fn(num_classes: int):
    """(logits [B, C'], labels int64 [B]) -> loss: BCE on one logit for 2 classes, else cross-entropy."""
    if num_classes == 2:
        bce = nn.BCEWithLogitsLoss()
        return lambda logits, y: bce(logits[:, 0], y.float())
    return nn.CrossEntropyLoss()


class ValidationMonitor:
    """Early stopping on a smoothed validation score (the mean of the last ``smooth`` validations).

    ``update(score)`` -> ``(improved, stop)``: ``improved`` when the smoothed score is strictly the best
    so far (none before ``smooth`` validations exist), ``stop`` when ``patience`` validations have
    passed since the last improvement (or since the first full window, if none improved yet).
    """

    def __init__(self, smooth: int = 1, patience: int = 1):
        self.smooth, self.patience = max(1, int(smooth)), max(1, int(patience))
        self.history: list[float] = []
        self.best, self.best_at = -math.inf, 0  # best smoothed score, number of validations then

    def update(self, score: float) -> tuple[bool, bool]:
        self.history.append(float(score))
        n = len(self.history)
        if n < self.smooth:
            return False, False
        value = float(np.mean(self.history[-self.smooth :]))
        if value > self.best:
            self.best, self.best_at = value, n
            return True, False
        return False, n - self.best_at >= self.patience


def default_patience(max_steps: int, steps_per_epoch: int) -> int:
    """eva's early stopping: 20% of the maximum number of epochs (at least 1)."""
    return max(1, round(0.2 * math.ceil(max_steps / steps_per_epoch)))


def linear_probe_settings(cfg) -> dict:
    """The keyword arguments of :func:`train_linear_probe` held by a ``LinearConfig``."""
    keys = ("lr", "weight_decay", "batch_size", "max_steps", "val_every", "patience", "warmup_epochs",
            "warmup_factor", "smooth")
    return {k: getattr(cfg, k) for k in keys}


def train_linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    seed: int,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    batch_size: int = 256,
    max_steps: int = 12_500,
    val_every: int = 0,
    patience: int | None = None,
    device: str = "cpu",
    warmup_epochs: int = 5,
    warmup_factor: float = 1.0 / 3.0,
    smooth: int = 1,
) -> dict:
    """Train one probe; returns the numbers of one run.

    train/val/test: (features float32 [N, D], labels int64 [N]). ``seed`` sets the head init and the
    data order. An epoch is one pass over the training set (``ceil(N / batch_size)`` steps); the lr is
    ``lr * warmup_factor`` for the first ``warmup_epochs`` epochs. Validation runs every ``val_every``
    steps (0: after every epoch). The monitored score is the mean validation balanced accuracy of the
    last ``smooth`` validations (none before ``smooth`` of them exist); training stops when
    ``patience`` validations (None: 20% of the maximum epochs) pass without a strictly better one.
    The head of the best monitored score is scored on ``test`` (or on ``val`` when ``test`` is None).
    """
    gen = torch.Generator().manual_seed(seed)
    xtr = torch.as_tensor(train[0], dtype=torch.float32, device=device)
    ytr = torch.as_tensor(train[1], dtype=torch.int64, device=device)
    xva = torch.as_tensor(val[0], dtype=torch.float32, device=device)
    yva = np.asarray(val[1])
    torch.manual_seed(seed)
    head = nn.Linear(xtr.shape[1], 1 if num_classes == 2 else num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = _loss_fn(num_classes)
    n = len(xtr)
    steps_per_epoch = max(1, -(-n // batch_size))
    every = val_every or steps_per_epoch
    monitor = ValidationMonitor(smooth, patience or default_patience(max_steps, steps_per_epoch))
    best_step, best_head = 0, copy.deepcopy(head.state_dict())
    order, pos, step = torch.randperm(n, generator=gen), 0, 0
    while step < max_steps:
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        for g in opt.param_groups:
            g["lr"] = lr * (warmup_factor if step // steps_per_epoch < warmup_epochs else 1.0)
        idx = order[pos : pos + batch_size].to(device)
        pos += batch_size
        head.train()
        loss = loss_fn(head(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % every == 0 or step == max_steps:
            head.eval()
            improved, stop = monitor.update(balanced_accuracy(yva, _predict(head, xva)))
            if improved:
                best_step, best_head = step, copy.deepcopy(head.state_dict())
            if stop:
                break
    if best_step == 0:  # fewer validations than ``smooth``: keep the last head
        best_step, best_head = step, head.state_dict()
    head.load_state_dict(best_head)
    head.eval()
    x_eval, y_eval = test if test is not None else val
    pred = _predict(head, torch.as_tensor(x_eval, dtype=torch.float32, device=device))
    y_eval = np.asarray(y_eval)
    return {
        "seed": seed,
        "steps": step,
        "best_step": best_step,
        "steps_per_epoch": steps_per_epoch,
        "logits": int(head.out_features),
        "val_balanced_accuracy": balanced_accuracy(yva, _predict(head, xva)),
        "balanced_accuracy": balanced_accuracy(y_eval, pred),
        "accuracy": float((pred == y_eval).mean()),
        "macro_f1": macro_f1(y_eval, pred, num_classes),
    }

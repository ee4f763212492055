"""eva's linear probe: one linear layer on frozen embeddings, early stopping on validation balanced
accuracy, best checkpoint reported on the test split (validation when there is no test)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from openpluto.eval.metrics import balanced_accuracy, macro_f1


def _predict(head: nn.Module, x: torch.Tensor, chunk: int = 8192) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([head(x[i : i + chunk]).argmax(1) for i in range(0, len(x), chunk)]).cpu().numpy()


def train_linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    num_classes: int,
    seed: int,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    max_steps: int = 12_500,
    val_every: int = 0,
    patience: int = 1_250,
    device: str = "cpu",
) -> dict:
    """Train one probe; returns the numbers of one run.

    train/val/test: (features float32 [N, D], labels int64 [N]). ``seed`` sets the head init and the
    data order. Validation runs every ``val_every`` steps (0: after each pass over the training set);
    training stops when ``patience`` steps pass without a strictly better validation balanced
    accuracy. The best head is scored on ``test`` (or on ``val`` when ``test`` is None).
    """
    gen = torch.Generator().manual_seed(seed)
    xtr = torch.as_tensor(train[0], dtype=torch.float32, device=device)
    ytr = torch.as_tensor(train[1], dtype=torch.int64, device=device)
    xva = torch.as_tensor(val[0], dtype=torch.float32, device=device)
    yva = np.asarray(val[1])
    torch.manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    n = len(xtr)
    steps_per_pass = max(1, -(-n // batch_size))
    every = val_every or steps_per_pass
    best = (-1.0, 0, copy.deepcopy(head.state_dict()))
    order, pos, step = torch.randperm(n, generator=gen), 0, 0
    while step < max_steps:
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
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
            score = balanced_accuracy(yva, _predict(head, xva))
            if score > best[0]:
                best = (score, step, copy.deepcopy(head.state_dict()))
            elif step - best[1] >= patience:
                break
    head.load_state_dict(best[2])
    head.eval()
    x_eval, y_eval = test if test is not None else val
    pred = _predict(head, torch.as_tensor(x_eval, dtype=torch.float32, device=device))
    y_eval = np.asarray(y_eval)
    return {
        "seed": seed,
        "steps": step,
        "best_step": best[1],
        "val_balanced_accuracy": best[0],
        "balanced_accuracy": balanced_accuracy(y_eval, pred),
        "accuracy": float((pred == y_eval).mean()),
        "macro_f1": macro_f1(y_eval, pred, num_classes),
    }

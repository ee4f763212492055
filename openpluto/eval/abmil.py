"""Gated-attention ABMIL (Ilse et al. 2018) as configured in eva: input projection to 128, gated
attention with 128 hidden units, MLP classifier; padded bags with a mask."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn

from openpluto.errors import OpenPlutoError
from openpluto.eval.metrics import balanced_accuracy, macro_f1


class GatedABMIL(nn.Module):
    """``forward(x [B, N, D], mask [B, N] bool, True = real tile) -> (logits [B, C], attention [B, N])``."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        projected_dim: int = 128,
        attention_dim: int = 128,
        mlp_dims: tuple[int, ...] = (128, 64),
        dropout: float = 0.0,
    ):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, projected_dim), nn.Dropout(dropout))
        self.attn_tanh = nn.Sequential(
            nn.Linear(projected_dim, attention_dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.attn_gate = nn.Sequential(
            nn.Linear(projected_dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.attn_score = nn.Linear(attention_dim, 1)
        layers: list[nn.Module] = []
        width = projected_dim
        for d in mlp_dims:
            layers += [nn.Linear(width, d), nn.ReLU(), nn.Dropout(dropout)]
            width = d
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)  # [B, N, P]
        score = self.attn_score(self.attn_tanh(h) * self.attn_gate(h)).squeeze(-1)  # [B, N]
        score = score.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(score, dim=1)
        pooled = torch.einsum("bn,bnp->bp", attn, h)
        return self.classifier(pooled), attn


def pad_bags(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``[N_i, D]`` -> zero-padded ``[B, max N, D]`` and mask ``[B, max N]`` (True = real)."""
    n = max(len(b) for b in bags)
    x = bags[0].new_zeros(len(bags), n, bags[0].shape[1])
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x, mask


def read_slide_labels(path: str | Path) -> list[dict]:
    """CSV ``slide,label[,split]`` -> rows (label kept as text)."""
    path = Path(path)
    if not path.is_file():
        raise OpenPlutoError(f"{path}: labels CSV does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in reader.fieldnames or []]
        if "slide" not in cols or "label" not in cols:
            raise OpenPlutoError(f"{path}: needs a header with columns slide,label,split (found {cols})")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise OpenPlutoError(f"{path}: no rows")
    return rows


def load_bags(folder: str | Path, slides: list[str]) -> list[np.ndarray]:
    """``folder/<slide>.h5`` ``features`` arrays, in the order of ``slides``."""
    import h5py

    folder = Path(folder)
    if not folder.is_dir():
        raise OpenPlutoError(f"{folder}: features folder does not exist (make it with `openpluto embed`)")
    missing = [s for s in slides if not (folder / f"{s}.h5").is_file()]
    if missing:
        raise OpenPlutoError(
            f"{folder}: no features for {len(missing)} slide(s) in the labels CSV, "
            f"e.g. {missing[0]}.h5; embed them or drop them from the CSV"
        )
    bags = []
    for s in slides:
        with h5py.File(folder / f"{s}.h5", "r") as f:
            if "features" not in f:
                raise OpenPlutoError(f"{folder / (s + '.h5')}: no 'features' dataset")
            a = f["features"][()].astype(np.float32)
        if a.ndim != 2 or len(a) == 0:
            raise OpenPlutoError(f"{folder / (s + '.h5')}: 'features' must be [N>0, D], got {a.shape}")
        bags.append(a)
    if len({b.shape[1] for b in bags}) > 1:
        raise OpenPlutoError(
            f"{folder}: slides have different feature widths {sorted({b.shape[1] for b in bags})}"
        )
    return bags


def _predict(model: GatedABMIL, bags: list[torch.Tensor], batch_size: int, device: str) -> np.ndarray:
    model.eval()
    preds = [torch.zeros(0, dtype=torch.int64)]
    with torch.no_grad():
        for i in range(0, len(bags), batch_size):
            x, m = pad_bags(bags[i : i + batch_size])
            preds.append(model(x.to(device), m.to(device))[0].argmax(1).cpu())
    return torch.cat(preds).numpy()


def train_abmil(
    bags: list[np.ndarray],
    labels: np.ndarray,
    splits: list[str],
    num_classes: int,
    seed: int,
    projected_dim: int = 128,
    attention_dim: int = 128,
    mlp_dims: tuple[int, ...] = (128, 64),
    dropout: float = 0.0,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    max_epochs: int = 100,
    patience: int = 20,
    max_tiles: int | None = None,
    device: str = "cpu",
) -> dict:
    """One ABMIL run: train on ``train``, early-stop (``patience`` epochs) and pick the best epoch by
    validation balanced accuracy, score on ``test`` (or ``val``). bags: list of ``[N_i, D]``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.as_tensor(b) for b in bags]
    labels = np.asarray(labels)
    tr = [i for i, s in enumerate(splits) if s == "train"]
    va = [i for i, s in enumerate(splits) if s == "val"]
    te = [i for i, s in enumerate(splits) if s == "test"] or va
    torch.manual_seed(seed)
    model = GatedABMIL(tensors[0].shape[1], num_classes, projected_dim, attention_dim, mlp_dims, dropout).to(
        device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    y_all = torch.as_tensor(labels, dtype=torch.int64)
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        order = [tr[i] for i in torch.randperm(len(tr), generator=gen).tolist()]
        for j in range(0, len(order), batch_size):
            idx = order[j : j + batch_size]
            batch = []
            for i in idx:
                b = tensors[i]
                if max_tiles and len(b) > max_tiles:
                    b = b[torch.randperm(len(b), generator=gen)[:max_tiles]]
                batch.append(b)
            x, m = pad_bags(batch)
            loss = loss_fn(model(x.to(device), m.to(device))[0], y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = balanced_accuracy(labels[va], _predict(model, [tensors[i] for i in va], batch_size, device))
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= patience:
            break
    model.load_state_dict(best[2])
    pred = _predict(model, [tensors[i] for i in te], batch_size, device)
    return {
        "seed": seed,
        "epochs": epoch,
        "best_epoch": best[1],
        "val_balanced_accuracy": best[0],
        "balanced_accuracy": balanced_accuracy(labels[te], pred),
        "macro_f1": macro_f1(labels[te], pred, num_classes),
        "accuracy": float((pred == labels[te]).mean()),
    }

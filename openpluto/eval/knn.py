"""DINO's weighted k-NN classifier: cosine similarity, top-k neighbours, votes weighted by
``exp(similarity / T)``."""

from __future__ import annotations

import numpy as np
import torch


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
    device: str = "cpu",
) -> np.ndarray:
    """Class scores ``[Q, C]`` for each query: sum over its ``k`` most cosine-similar training
    items of ``exp(sim / temperature)`` into that item's class. Argmax gives the prediction."""
    bank = torch.nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32, device=device), dim=1)
    labels = torch.as_tensor(train_y, dtype=torch.int64, device=device)
    q_all = torch.as_tensor(query_x, dtype=torch.float32, device=device)
    k = min(k, len(bank))
    out = []
    for i in range(0, len(q_all), chunk):
        q = torch.nn.functional.normalize(q_all[i : i + chunk], dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        scores = torch.zeros(len(q), num_classes, dtype=torch.float32, device=device)
        scores.scatter_add_(1, labels[idx], weights)
        out.append(scores.cpu())
    return torch.cat(out).numpy()

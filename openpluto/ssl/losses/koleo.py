"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; used by
DINOv2 and PLUTO-4 with weight 0.1 on the student CLS token of each global crop).

Kozachenko-Leonenko differential-entropy estimator: with x_b the L2-normalised features of the B
images of one crop on one rank and d_b the distance to the nearest other x,

    L = - (1/B) sum_b log(d_b + ε)

Safe for small per-rank batches: with B < 2 there is no neighbour and the loss is exactly 0 (still
attached to the graph, zero gradient); identical vectors give a finite -log(2ε) with zero gradient
(the distance is smoothed as sqrt(|x - y|² + ε²)), never inf or NaN. Computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """``x [B, D] -> scalar``: mean negative log distance to the nearest neighbour within the batch."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if x.shape[0] < 2:
                return x.sum() * 0.0
            x = F.normalize(x, dim=-1, eps=1e-8)
            with torch.no_grad():
                sim = x @ x.t()
                sim.fill_diagonal_(-3.0)  # below any cosine: never pick yourself
                nn_idx = sim.argmax(dim=1)
            diff = x - x[nn_idx]
            dist = torch.sqrt((diff * diff).sum(dim=-1) + self.eps * self.eps)
            return -torch.log(dist + self.eps).mean()

"""Teacher centering: turn teacher logits into target probabilities without collapse, in float32.

- :func:`sinkhorn_knopp` (Caron et al. 2020, SwAV; used by DINOv2): the target ``Q [B, K]`` is the
  matrix closest to ``exp(t / τ)`` whose rows each sum to 1 and whose columns each sum to B/K, found
  by alternately normalising columns (prototypes) and rows (samples). With ``torch.distributed``
  initialised (world size > 1) the sums and the sample count are all-reduced, so B is the global batch.
- :class:`SoftmaxCentering` (Caron et al. 2021, DINO): ``softmax((t - c) / τ)`` with an EMA centre
  ``c <- m c + (1 - m) mean_b t_b`` (mean over the global batch), kept as a float32 buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(x, op=op)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp targets ``[B, K]`` (float32): rows sum to 1, columns to B/K (B summed over ranks).

    ``teacher_logits`` ``[B, K]``, any float dtype; ``temp`` the teacher temperature. Every rank must
    call this (B may be 0 on some ranks).
    """
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        t = teacher_logits.float() / temp
        # Subtracting the global max leaves Q unchanged (it is normalised) and keeps exp finite.
        t_max = t.max() if t.numel() else torch.tensor(-torch.inf, device=t.device)
        t_max = _all_reduce(t_max.reshape(1).clone(), dist.ReduceOp.MAX)
        q = torch.exp(t - t_max).t()  # [K, B]
        k = q.shape[0]
        b = _all_reduce(torch.tensor([float(q.shape[1])], device=q.device))
        q /= _all_reduce(q.sum().reshape(1))
        for _ in range(n_iterations):
            rows = _all_reduce(q.sum(dim=1, keepdim=True))  # per prototype, over the global batch
            q /= rows.clamp(min=torch.finfo(q.dtype).tiny)
            q /= k
            q /= q.sum(dim=0, keepdim=True).clamp(min=torch.finfo(q.dtype).tiny)  # per sample
            q /= b
        q *= b
        return q.t()


class SoftmaxCentering(nn.Module):
    """DINO softmax centering with an EMA centre buffer ``center [1, K]`` (float32).

    ``forward(t [B, K], temp) -> softmax((t - center) / temp)`` (float32, centre of earlier steps);
    ``update(t)`` then moves the centre towards the (global) batch mean with ``momentum``.
    """

    def __init__(self, out_dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
            return torch.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        t = teacher_logits.detach().float()
        total = _all_reduce(t.sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor([float(t.shape[0])], device=t.device))
        if float(count) == 0:
            return
        batch_center = total / count
        self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)

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
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float = 1.0, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp targets ``[B, K]`` (float32): rows sum to 1, columns to B/K (B summed over ranks).

    ``teacher_logits`` ``[B, K]``, any float dtype (never modified); ``temp`` the teacher temperature
    (1 when the logits are already divided by it). Every rank must call this (B may be 0 on some ranks).

    The iterations keep ``Q = diag(u) E diag(v)`` with ``E = exp(t / temp - max)`` as two scaling
    vectors, so each one reads E twice (two matrix-vector products) instead of rewriting it four
    times; the result equals the textbook loop (normalise prototypes, then samples) to float rounding.
    No host synchronisation: counts stay on the device.
    """
    with torch.autocast(device_type=teacher_logits.device.type, enabled=False):
        e = teacher_logits.float()
        if e.data_ptr() == teacher_logits.data_ptr():
            e = e.clone()
        if temp != 1.0:
            e.div_(temp)
        # Subtracting the global max leaves Q unchanged (it is normalised) and keeps exp finite.
        local_max = e.amax() if e.numel() else torch.full((), -torch.inf, device=e.device)
        e.sub_(_all_reduce(local_max.reshape(1), dist.ReduceOp.MAX)).exp_()  # [B, K], max 1
        n_rows, k = e.shape
        b = _all_reduce(torch.full((1,), float(n_rows), device=e.device))  # global B, on the device
        tiny = torch.finfo(e.dtype).tiny
        u = torch.ones(n_rows, device=e.device, dtype=e.dtype)
        v = torch.ones(k, device=e.device, dtype=e.dtype)
        for _ in range(n_iterations):
            col = _all_reduce(torch.mv(e.t(), u))  # per prototype, over the global batch
            v = (col.clamp_(min=tiny) * k).reciprocal_()
            row = torch.mv(e, v)  # per sample
            u = (row.clamp_(min=tiny) * b).reciprocal_()
        return e.mul_(v).mul_((u * b)[:, None])


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
        count = _all_reduce(torch.full((1,), float(t.shape[0]), device=t.device))
        moved = self.center * self.momentum + (total / count.clamp(min=1.0)) * (1.0 - self.momentum)
        self.center.copy_(torch.where(count > 0, moved, self.center))  # no host sync; empty batch: unchanged

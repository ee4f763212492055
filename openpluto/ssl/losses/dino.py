"""DINO self-distillation loss (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"; Oquab et al. 2024, DINOv2).

For student views s and teacher views t (pairs with s == t left out when ``skip_same`` is set):

    L = - sum_{(s, t)} (1/B) sum_b sum_k P_t[b, k] * log softmax(z_s[b] / τ_s)_k

``P_t`` are the centred teacher probabilities (Sinkhorn-Knopp or softmax centering, already divided
by the teacher temperature). The sum over pairs is not averaged here: the caller divides by the
total number of pairs of the step (DINOv2's ``n_global*n_local + n_global*(n_global-1)``).
Computed in float32 with autocast off; with ``student_temp=1`` the logits are taken as already divided
by the temperature (e.g. by the head's ``scale``), which spares a pass over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def scaled_float(logits: torch.Tensor, temp: float) -> torch.Tensor:
    """``logits / temp`` in float32 with one pass over the logits (none when already float32 and temp 1)."""
    x = logits.float()
    if temp == 1.0:
        return x
    return x.div_(temp) if x.data_ptr() != logits.data_ptr() else x / temp


class DINOLoss(nn.Module):
    """Cross-entropy between centred teacher targets and student softmax, summed over view pairs."""

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        self.student_temp = float(student_temp)

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, skip_same: bool = False
                ) -> torch.Tensor:
        """``student_logits [S, B, K]``, ``teacher_probs [T, B, K]`` -> scalar (float32).

        With ``skip_same`` (student and teacher see the same S == T views), pair (i, i) is left out.
        """
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            log_p = F.log_softmax(scaled_float(student_logits, self.student_temp), dim=-1)  # [S, B, K]
            # cross[s, t] = (1/B) sum_b sum_k P_t[b, k] log p_s[b, k]
            cross = torch.einsum("tbk,sbk->st", teacher_probs.float(), log_p) / log_p.shape[1]
            if skip_same:
                cross = cross * (1.0 - torch.eye(cross.shape[0], device=cross.device, dtype=cross.dtype))
            return -cross.sum()

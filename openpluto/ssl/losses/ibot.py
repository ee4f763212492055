"""iBOT masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer";
weighting of Oquab et al. 2024, DINOv2).

The student sees global crop i with its masked patch tokens replaced by a mask token; the teacher sees
it unmasked. Over the masked tokens j of image i (m_i of them, M_i the set):

    L = - (1/N) sum_i (1/m_i) sum_{j in M_i} sum_k P_ij[k] * log softmax(z_ij / τ_s)_k

where N counts all global crops of the step (masked or not): each masked image weighs the same
whatever its masked share. Computed in float32 with autocast off (``student_temp=1``: the logits are
already divided by the temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openpluto.ssl.losses.dino import scaled_float


class IBOTPatchLoss(nn.Module):
    """Per-image normalised cross-entropy on masked patch tokens only."""

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        self.student_temp = float(student_temp)

    @staticmethod
    def token_weights(masks: torch.Tensor) -> torch.Tensor:
        """``[M]`` float32: 1 / (masked tokens of its image) for each True entry of ``masks [N, P]``."""
        per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()  # [N, 1]
        return (1.0 / per_image).expand(masks.shape)[masks]

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """``student_logits``/``teacher_probs`` ``[M, K]`` for the True entries of ``masks [N, P]`` (in
        row-major order, i.e. ``tokens[masks]``) -> scalar (float32). ``weights`` ``[M]`` may be given
        precomputed (:meth:`token_weights`)."""
        with torch.autocast(device_type=student_logits.device.type, enabled=False):
            n_images = masks.shape[0]
            if student_logits.shape[0] == 0 or n_images == 0:
                return student_logits.float().sum() * 0.0
            log_p = F.log_softmax(scaled_float(student_logits, self.student_temp), dim=-1)
            if weights is None:
                weights = self.token_weights(masks)
            # sum_m w_m sum_k P[m, k] log p[m, k] as one dot product over the M*K entries
            weighted = teacher_probs.float() * weights.to(log_p.dtype)[:, None]
            return -torch.dot(weighted.flatten(), log_p.flatten()) / n_images

"""DINO / iBOT projection head (Caron et al. 2021, DINO; Oquab et al. 2024, DINOv2).

``x [*, in_dim] -> MLP (n_layers Linear, GELU between) -> [*, bottleneck_dim] -> L2-normalise ->
last_layer -> [*, out_dim]`` logits over the prototypes. ``last_layer`` is a bias-free linear layer
whose rows (the prototypes) are weight-normalised with a fixed gain of 1 (DINO's ``norm_last_layer``),
so each logit is a cosine similarity in [-1, 1]. ``scale`` (e.g. 1 / temperature) multiplies the
normalised prototypes instead of the ``[*, out_dim]`` logits: the same numbers for one pass over a
``[out_dim, bottleneck]`` matrix instead of one over the (much larger) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ScaledRowNormalize(torch.autograd.Function):
    """``w * scale / ||w||_row`` (rows clamped to norm >= eps) with a hand-written backward.

    Autograd's path through ``F.normalize`` and the scaling makes about ten passes over the
    ``[out_dim, in_dim]`` prototypes per backward (16.7M entries at 65,536 x 256); this makes four.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
        norm = w.norm(dim=-1, keepdim=True)
        inv = norm.clamp_min(eps).reciprocal_()  # [out, 1]
        ctx.save_for_backward(w, inv, norm > eps)
        ctx.scale = scale
        return w * (inv * scale)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, inv, unclamped = ctx.saved_tensors
        # d(w / |w|) = (g - w_hat (w_hat . g)) / |w|, with w_hat = w / |w|; no projection where clamped
        dot = torch.linalg.vecdot(g, w, dim=-1).unsqueeze(-1) * (inv * inv) * unclamped
        return (g - w * dot) * (inv * ctx.scale), None, None


class NormalizedLinear(nn.Module):
    """Bias-free linear layer with unit-norm rows: ``y = x @ (W / ||W||_row)^T`` (weight norm, gain 1).

    The raw direction ``weight [out_dim, in_dim]`` is the only parameter (plain tensor, so DDP/FSDP2 and
    safetensors handle it without parametrisation hooks).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return F.linear(x, _ScaledRowNormalize.apply(self.weight, float(scale), 1e-12))

    def extra_repr(self) -> str:
        return f"in_dim={self.weight.shape[1]}, out_dim={self.weight.shape[0]}"


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2-normalised -> weight-normalised prototypes ``last_layer``.

    Args:
        in_dim: backbone width D. out_dim: number of prototypes K (DINOv2: 65536).
        hidden_dim: MLP width (DINOv2: 2048). bottleneck_dim: (DINOv2: 256). n_layers: >= 1 (DINOv2: 3).
    Shapes: ``[..., in_dim] -> [..., out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3):
        super().__init__()
        n_layers = max(1, int(n_layers))
        if n_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``[..., in_dim] -> [..., out_dim]`` cosine logits times ``scale``."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float32 else 1e-4
        x = F.normalize(x, dim=-1, eps=eps)
        return self.last_layer(x, scale)

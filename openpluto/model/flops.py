"""Analytic FLOPs of a ViT forward pass (multiply-add = 2 FLOPs), for throughput-as-%-of-peak figures.

Counted: patch embedding, qkv / output projections, attention (``q k^T`` and ``attn @ v``), FFN
(two matmuls for an MLP, three for SwiGLU). Not counted: norms, softmax, RoPE, residuals, the
per-batch PI resize of a FlexiViT kernel (a few % at most). A training step (forward + backward) is
counted as 3x the forward.
"""

from __future__ import annotations


def vit_forward_flops(dim: int, depth: int, hidden: int, swiglu: bool, patches: int, prefix: int,
                      patch: int, in_chans: int = 3) -> float:
    """FLOPs of one image's forward with ``patches`` patch tokens of ``patch`` px and ``prefix``
    cls/register tokens; ``hidden`` = FFN width (per branch for SwiGLU)."""
    n = patches + prefix
    per_block = (2 * n * dim * 3 * dim  # qkv
                 + 2 * 2 * n * n * dim  # q k^T and attn @ v
                 + 2 * n * dim * dim  # output projection
                 + 2 * n * dim * hidden * (3 if swiglu else 2))  # FFN
    return depth * per_block + 2 * patches * dim * in_chans * patch * patch


def model_forward_flops(cfg, img_size: int, patch: int) -> float:
    """``vit_forward_flops`` of a ``ModelConfig`` at a square ``img_size`` px input and ``patch`` px."""
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    return vit_forward_flops(cfg.embed_dim, cfg.depth, hidden, cfg.ffn == "swiglu", (img_size // patch) ** 2,
                             1 + cfg.num_registers, patch, cfg.in_chans)

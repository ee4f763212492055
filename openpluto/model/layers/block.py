"""Transformer block: timm's ``EvaBlock`` parameters, with RoPE applied to q and k in one fused pass.

``PlutoBlock`` *is* an ``EvaBlock`` (same submodules and parameter names: ``norm1``, ``attn.qkv``,
``attn.q_bias``/``attn.v_bias``, ``attn.proj``, ``gamma_1``, ``norm2``, ``mlp``, ``gamma_2``), so its
weights load into timm's Eva / DINOv3 models unchanged. Its SwiGLU FFN is timm's packed ``GluMlp``
(one ``fc1`` matmul for both halves). Only the forward differs from timm's: instead of slicing the
prefix tokens off q and k, rotating each and concatenating them back (about 14 element-wise passes
per block), it rotates q and k together with a table that spans every token and is the identity on
the cls/register rows (see ``openpluto.model.layers.rope``):

- CPU, eager: the reference ``apply_rope`` on the permuted q/k (fp32 models: no casts at all);
- CUDA, or inside ``torch.compile``: ``rope_qk`` on the ``[B, T, 3, H, hd]`` projection, one fused
  element-wise kernel whose outputs feed SDPA as strided views (no permute copies).

``sdpa_backends`` (set by ``PlutoViT`` from ``ModelConfig.attn_backend``) puts one SDPA backend
(cuDNN, flash, ...) first via ``torch.nn.attention.sdpa_kernel``; None leaves PyTorch's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.eva import EvaBlock
from torch.nn.attention import SDPBackend, sdpa_kernel

from openpluto.model.layers.rope import apply_rope, rope_qk

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_priority(name: str) -> list[SDPBackend] | None:
    """``"auto"`` -> None (PyTorch's order); else every backend with ``name`` first (fallbacks kept,
    so e.g. ``cudnn`` on a CPU still runs)."""
    if name == "auto":
        return None
    first = SDPA_BACKENDS[name]
    return [first] + [b for b in SDPA_BACKENDS.values() if b != first]


class PlutoBlock(EvaBlock):
    """Pre-norm ViT block (attention + MLP/SwiGLU, LayerScale, stochastic depth) with fused 2D RoPE."""

    sdpa_backends: list[SDPBackend] | None = None

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
        if self.sdpa_backends is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        with sdpa_kernel(self.sdpa_backends, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)

    def attention(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-head self-attention of ``x`` ``[B, T, D]``; ``rope`` from ``rope_tables`` or None."""
        attn = self.attn
        B, T, D = x.shape
        bias = None
        if attn.q_bias is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        # q/k/v are taken with split/unbind/squeeze, never by indexing: the backward of an index or a
        # slice writes a zero tensor the size of the whole projection for each of q, k and v, whereas
        # these views' backward is one concatenation.
        qkv = F.linear(x, attn.qkv.weight, bias).view(B, T, 3, attn.num_heads, -1)
        if rope is not None and (qkv.is_cuda or torch.compiler.is_compiling()):
            qk, v = qkv.split((2, 1), dim=2)
            q, k = rope_qk(qk, rope).unbind(2)  # [B, T, H, hd] each, in the compute dtype
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)
        else:
            qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
            if rope is not None:  # q and k together; tables stay fp32 under autocast, result cast back
                qk, v = qkv.split((2, 1))
                q, k = apply_rope(qk, rope).to(qkv.dtype).unbind(0)
                v = v.squeeze(0)
            else:
                q, k, v = qkv.unbind(0)
        out = self._sdpa(q, k, v, attn.attn_drop.p if self.training else 0.0)
        out = attn.norm(out.transpose(1, 2).reshape(B, T, -1))
        return attn.proj_drop(attn.proj(out))

    @staticmethod
    def _residual(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None, drop_path):
        if gamma is None:
            return x + drop_path(branch)
        if isinstance(drop_path, torch.nn.Identity):
            return torch.addcmul(x, gamma, branch)  # x + gamma * branch in one pass
        return x + drop_path(gamma * branch)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        x = self._residual(x, self.attention(self.norm1(x), rope), self.gamma_1, self.drop_path1)
        return self._residual(x, self.mlp(self.norm2(x)), self.gamma_2, self.drop_path2)

"""Transformer block: timm's ``EvaBlock`` parameters, with RoPE applied to q and k in one fused pass.

``PlutoBlock`` *is* an ``EvaBlock`` (same submodules and parameter names: ``norm1``, ``attn.qkv``,
``attn.q_bias``/``attn.v_bias``, ``attn.proj``, ``gamma_1``, ``norm2``, ``mlp``, ``gamma_2``), so its
weights load into timm's Eva / DINOv3 models unchanged. Only the forward differs: instead of slicing
the prefix tokens off q and k, rotating each and concatenating them back (about 14 element-wise
passes per block), it rotates q and k together with a table that spans every token and is the
identity on the cls/register rows (3 passes). The maths is DINOv3's rotate-half RoPE:
``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``, written as
``x * cos + roll_half(x) * sin_signed`` with ``roll_half([x1, x2]) = [x2, x1]`` and
``sin_signed = [-sin1, sin2]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.eva import EvaBlock


def rope_tables(rope_embed: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """timm ``RotaryEmbeddingDinoV3.get_embed`` output ``[N, 2 * hd]`` (sin, cos) -> ``[2, P + N, hd]``
    (cos, signed sin) covering the ``P`` prefix tokens too (cos 1, sin 0: not rotated)."""
    sin, cos = rope_embed.chunk(2, dim=-1)
    hd = sin.shape[-1]
    sign = torch.ones(hd, dtype=sin.dtype, device=sin.device)
    sign[: hd // 2] = -1
    table = torch.stack([cos, sin * sign])  # [2, N, hd]
    prefix = torch.zeros(2, num_prefix_tokens, hd, dtype=table.dtype, device=table.device)
    prefix[0] = 1.0
    return torch.cat([prefix, table], dim=1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, hd]`` with ``rope_tables`` output ``[2, T, hd]``."""
    cos, sin = table[0], table[1]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class PlutoBlock(EvaBlock):
    """Pre-norm ViT block (attention + MLP/SwiGLU, LayerScale, stochastic depth) with fused 2D RoPE."""

    def attention(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-head self-attention of ``x`` ``[B, T, D]``; ``rope`` from ``rope_tables`` or None."""
        attn = self.attn
        B, T, D = x.shape
        bias = None
        if attn.q_bias is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias).reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            # q and k together [2, B, H, T, hd]; tables stay fp32 under autocast (as timm), result cast back
            qk = apply_rope(qkv[:2], rope).to(qkv.dtype)
            q, k = qk.unbind(0)
        else:
            q, k = qkv[0], qkv[1]
        v = qkv[2]
        dropout = attn.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
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

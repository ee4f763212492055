"""2D RoPE: attention depends on relative positions only, and cls/register tokens are never rotated."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from openpluto.model.layers import apply_rope


def _rotated_scores(model, h: int, w: int) -> torch.Tensor:
    """q.k logits over all 1+R+N tokens when every token has the same q and k before rotation,
    rotated exactly as the model's blocks do -> ([T, T] logits, rotated q)."""
    _, tables, grid = model.prepare_tokens(torch.zeros(1, 3, 8 * h, 8 * w), patch_size=8)
    assert grid == (h, w)
    g = torch.Generator().manual_seed(0)
    hd = model.cfg.head_dim
    q = torch.randn(hd, generator=g).expand(tables.shape[1], hd)
    k = torch.randn(hd, generator=g).expand(tables.shape[1], hd)
    qr, kr = apply_rope(q, tables), apply_rope(k, tables)
    return qr @ kr.T, qr, q


def test_rope_logits_depend_only_on_relative_position(micro):
    r = micro.num_prefix_tokens
    for h, w in ((6, 6), (4, 7)):  # square and non-square grids
        s_all, qr, q = _rotated_scores(micro, h, w)
        torch.testing.assert_close(qr[:r], q[:r])  # cls and registers are not rotated
        s = s_all[r:, r:]
        for di, dj in ((0, 1), (1, 0), (2, -3), (-1, 2)):  # token (i, j) has row-major index i * w + j
            vals = [s[i * w + j, (i + di) * w + j + dj]
                    for i in range(h) for j in range(w) if 0 <= i + di < h and 0 <= j + dj < w]
            vals = torch.stack(vals)
            assert (vals - vals[0]).abs().max() < 1e-4, (h, w, di, dj)
        # ... and positions do matter: different offsets give different logits
        assert (s[0, 1] - s[0, w + 2]).abs() > 1e-3


def _reference_rope(h: int, w: int, head_dim: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv3 RoPE written out: patch-centre coords in [-1, 1] per axis, periods T^(2i/(d/2))."""
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)  # [N, 2] (y, x)
    n = head_dim // 4
    periods = temperature ** (2 * torch.arange(n) / (head_dim // 2))
    angles = (2 * math.pi * coords[:, :, None] / periods).flatten(1)  # [N, head_dim/2]
    angles = torch.cat([angles, angles], -1)  # rotate-half layout
    return angles.sin(), angles.cos()


def _rotate(x, sin, cos):
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_first_block_matches_reference_attention_with_unrotated_prefix(micro):
    """Recompute block 0 by hand: RoPE on patch tokens only (cls + 2 registers untouched)."""
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens, rope, (h, w) = micro.prepare_tokens(x, patch_size=8)
        out = micro.blocks[0](tokens, rope=rope)
        blk = micro.blocks[0]
        B, T, D = tokens.shape
        H, hd = micro.cfg.num_heads, micro.cfg.head_dim
        y = blk.norm1(tokens)
        bias = torch.cat([blk.attn.q_bias, torch.zeros_like(blk.attn.q_bias), blk.attn.v_bias])
        q, k, v = F.linear(y, blk.attn.qkv.weight, bias).reshape(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        sin, cos = _reference_rope(h, w, hd, micro.cfg.rope_temperature)
        r = micro.num_prefix_tokens
        assert r == 3
        q = torch.cat([q[:, :, :r], _rotate(q[:, :, r:], sin, cos)], 2)
        k = torch.cat([k[:, :, :r], _rotate(k[:, :, r:], sin, cos)], 2)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1) @ v
        z = tokens + blk.gamma_1 * blk.attn.proj(a.transpose(1, 2).reshape(B, T, D))
        ref = z + blk.gamma_2 * blk.mlp(blk.norm2(z))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_rope_has_no_position_table_and_runs_any_grid(micro):
    assert micro.pos_embed is None
    assert not any("pos" in n or "rope" in n for n, _ in micro.named_parameters())
    for hw in ((32, 96), (96, 32), (40, 40)):
        out = micro.forward_features(torch.randn(1, 3, *hw), patch_size=8)
        assert out["grid"] == (hw[0] // 8, hw[1] // 8)

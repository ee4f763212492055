"""FlexiViT: PI-resize is exact where theory says (upsampling), and every patch size trains the kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openpluto.model import build_model
from openpluto.model.layers import FlexiPatchEmbed


def _up(x: torch.Tensor, size: int) -> torch.Tensor:
    """The resize the PI matrices invert: bicubic, antialiased, align_corners=False."""
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def test_pi_resize_preserves_tokens_when_upsampling():
    torch.manual_seed(0)
    pe = FlexiPatchEmbed((8, 16, 32), kernel_size=8, in_chans=3, embed_dim=32)
    x = torch.randn(5, 3, 8, 8)  # one 8x8 patch per image
    ref = pe(x, 8).flatten(1)  # <x, w> + b
    for p in (16, 32):
        tok = pe(_up(x, p), p).flatten(1)  # <resize(x), resize_PI(w)> + b
        torch.testing.assert_close(tok, ref, atol=2e-5, rtol=1e-4)
        # the PI kernel is not a plain resize of the stored kernel: that would be off by far more
        naive = F.interpolate(pe.proj.weight, size=(p, p), mode="bicubic", align_corners=False)
        naive_tok = F.conv2d(_up(x, p), naive, pe.proj.bias, stride=p).flatten(1)
        assert (naive_tok - ref).abs().max() > 100 * (tok - ref).abs().max() + 1e-3


def _up_patchwise(x: torch.Tensor, k: int, p: int) -> torch.Tensor:
    """Upsample each k x k patch of ``x`` on its own to p x p (the resize the PI identity is about)."""
    B, C, H, W = x.shape
    patches = x.reshape(B, C, H // k, k, W // k, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, k, k)
    up = _up(patches, p).reshape(B, H // k, W // k, C, p, p)
    return up.permute(0, 3, 1, 4, 2, 5).reshape(B, C, H // k * p, W // k * p)


def test_whole_model_on_upsampled_image_matches_small_patch(micro):
    # Same token grid (8x6) from a 64x48 image at patch 8 and its patch-wise 2x / 4x upsampling at
    # 16 / 32: PI-resize makes the tokens equal, RoPE coordinates are equal, so every output is equal.
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = micro.forward_features(x, patch_size=8)
        for p in (16, 32):
            out = micro.forward_features(_up_patchwise(x, 8, p), patch_size=p)
            assert out["grid"] == ref["grid"] == (8, 6)
            torch.testing.assert_close(out["patch"], ref["patch"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out["cls"], ref["cls"], atol=1e-4, rtol=1e-4)


def test_gradients_reach_stored_kernel_from_every_patch_size(micro):
    micro.train()
    w = micro.patch_embed.proj.weight
    assert w.shape == (128, 3, 8, 8)
    grads = {}
    for p in micro.patch_sizes:
        micro.zero_grad(set_to_none=True)
        x = torch.randn(2, 3, 64, 64)
        micro.forward_features(x, patch_size=p)["patch"].pow(2).mean().backward()
        assert w.grad is not None and w.grad.shape == w.shape
        assert w.grad.abs().sum() > 0
        grads[p] = w.grad.clone()
    # different patch sizes push the kernel in different directions (the resize is not a no-op)
    assert not torch.allclose(grads[8], grads[32])


def test_pi_matrices_are_cached_and_kernel_is_a_function_of_the_stored_weight():
    pe = FlexiPatchEmbed((8, 16), kernel_size=8, in_chans=3, embed_dim=4)
    k1 = pe.kernel(16)
    with torch.no_grad():
        pe.proj.weight.mul_(2.0)
    k2 = pe.kernel(16)
    torch.testing.assert_close(k2, 2 * k1)  # linear in the stored weight, recomputed every call
    assert pe.kernel(8) is pe.proj.weight  # the stored size needs no resize


def test_kernel_stored_at_custom_size():
    model = build_model("vit_micro_flexi", depth=1, patch_kernel_size=32)
    assert model.patch_embed.proj.weight.shape[-1] == 32
    out = model.forward_features(torch.randn(1, 3, 64, 64), patch_size=8)
    assert out["patch"].shape == (1, 64, 128)

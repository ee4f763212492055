"""FlexiViT patch embedding: one stored kernel, PI-resized to the requested patch size on every forward.

FlexiViT (Beyer et al. 2023, Algorithm 1) keeps a single ``k x k`` kernel ``w``. To embed patches of
``p x p`` px it uses ``resize_PI(w) = pinv(B^T) w``, where ``B`` is the (bicubic) resize matrix from
``k x k`` to ``p x p``. When ``p >= k`` (upsampling), ``B^T`` has full row rank, so
``<B x, resize_PI(w)> = <x, w>`` exactly for every ``k x k`` patch ``x``: a ``p``-px token of an image
upsampled by ``p / k`` equals the ``k``-px token of the original. When ``p < k`` the identity only
holds in the least-squares sense. openpluto therefore stores the kernel at the *smallest* patch size
(``ModelConfig.patch_kernel_size``, default ``min(patch_sizes)``, e.g. 8 for 8/16/32), so that every
resize is an exact upsampling; the resize is a matmul with a cached pseudo-inverse, differentiable,
so the stored kernel receives gradients from every patch size.

The pseudo-inverse matrices come from timm's ``PatchEmbedInterpolator`` and are cached per
(target size, device, dtype) for this module's fixed stored size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbedInterpolator
from torch import nn

from openpluto.errors import OpenPlutoError


class FlexiPatchEmbed(nn.Module):
    """``[B, C, H, W]`` image -> ``[B, H/p, W/p, D]`` tokens at patch size ``p`` (any of ``patch_sizes``).

    The stored parameter is ``proj.weight`` ``[D, C, k, k]`` (+ ``proj.bias`` ``[D]``), named like
    timm's ``PatchEmbed`` so exported checkpoints need no renaming.
    """

    def __init__(
        self,
        patch_sizes: tuple[int, ...],
        kernel_size: int,
        in_chans: int = 3,
        embed_dim: int = 768,
        interpolation: str = "bicubic",
        antialias: bool = True,
    ) -> None:
        super().__init__()
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.kernel_size = int(kernel_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.kernel_size, stride=self.kernel_size)
        self.interpolator = PatchEmbedInterpolator(
            base_patch_size=(self.kernel_size, self.kernel_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
            interpolation=interpolation,
            antialias=antialias,
        )

    def kernel(self, patch_size: int) -> torch.Tensor:
        """The stored kernel PI-resized to ``[D, C, patch_size, patch_size]`` (differentiable)."""
        return self.interpolator.resample_conv_weight(self.proj.weight, (patch_size, patch_size))

    def forward(self, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        """``x`` ``[B, C, H, W]`` with ``H, W`` divisible by ``patch_size`` -> ``[B, H/p, W/p, D]``."""
        h, w = x.shape[-2:]
        if h % patch_size or w % patch_size:
            raise OpenPlutoError(
                f"image size {h}x{w} px is not divisible by patch size {patch_size}; "
                f"resize or crop the input to a multiple of {patch_size}")
        weight = self.kernel(patch_size)
        out = F.conv2d(x, weight.to(x.dtype), self.proj.bias, stride=patch_size)
        return out.permute(0, 2, 3, 1)

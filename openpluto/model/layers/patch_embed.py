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

With ``cache_kernels`` on (frozen encoders turn it on: embedding and evaluation), the resized kernel
itself is cached per (patch size, device, dtype) whenever no gradient is wanted for it, and reused
while the stored weight is unchanged: each entry is stamped with the weight's storage address and
autograd version counter, which every in-place change (optimizer step, ``load_state_dict``, EMA
update, ``.to()``) bumps or moves. It is off by default because FSDP2 refills its unsharded
parameters in place *without* bumping the version counter, so a sharded EMA teacher could see a
stale kernel (and its kernel changes every step anyway).
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
        self.cache_kernels = False
        self._kernel_cache: dict[tuple, tuple[tuple[int, int], torch.Tensor]] = {}
        self.interpolator = PatchEmbedInterpolator(
            base_patch_size=(self.kernel_size, self.kernel_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
            interpolation=interpolation,
            antialias=antialias,
        )

    def _resize(self, weight: torch.Tensor, patch_size: int) -> torch.Tensor:
        return self.interpolator.resample_conv_weight(weight, (patch_size, patch_size))

    def _stamp(self, weight: torch.Tensor) -> tuple[int, int] | None:
        """(storage address, version counter) of the weight, or None when it must not be cached."""
        if not self.cache_kernels or (torch.is_grad_enabled() and weight.requires_grad):
            return None
        if torch.compiler.is_compiling():
            return None
        try:
            return weight.data_ptr(), weight._version
        except RuntimeError:  # inference tensors have no version counter
            return None

    def kernel(self, patch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored kernel PI-resized to ``[D, C, patch_size, patch_size]`` (in ``dtype`` if given).

        Differentiable when gradients are wanted; otherwise served from the cache (see the module
        docstring) when ``cache_kernels`` is on.
        """
        weight = self.proj.weight
        dtype = dtype or weight.dtype
        if patch_size == self.kernel_size:
            return weight.to(dtype)
        stamp = self._stamp(weight)
        if stamp is None:
            return self._resize(weight, patch_size).to(dtype)
        key = (patch_size, weight.device, dtype)
        hit = self._kernel_cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        with torch.inference_mode(False), torch.no_grad():
            out = self._resize(weight, patch_size).to(dtype)
        self._kernel_cache[key] = (stamp, out)
        return out

    def _apply(self, fn, *args, **kwargs):
        self._kernel_cache.clear()  # moved or cast: the cached kernels belong to the old tensors
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        """``x`` ``[B, C, H, W]`` with ``H, W`` divisible by ``patch_size`` -> ``[B, H/p, W/p, D]``."""
        h, w = x.shape[-2:]
        if h % patch_size or w % patch_size:
            raise OpenPlutoError(
                f"image size {h}x{w} px is not divisible by patch size {patch_size}; "
                f"resize or crop the input to a multiple of {patch_size}")
        out = F.conv2d(x, self.kernel(patch_size, x.dtype), self.proj.bias, stride=patch_size)
        return out.permute(0, 2, 3, 1)

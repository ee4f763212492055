"""PlutoViT: the PLUTO-4 backbone (FlexiViT patch sizes, 2D RoPE or learned positions, registers).

Token layout (as DINOv2/DINOv3): ``[cls, reg_1..reg_R, patch_1..patch_N]``, patches in row-major order.

- Patch embedding: ``FlexiPatchEmbed`` (one stored kernel, PI-resized per forward; see its docstring).
- Positions: ``pos_embed="rope"`` uses timm's ``RotaryEmbeddingDinoV3`` (coordinates of patch centres
  normalised to [-1, 1] per axis, so any grid, square or not, at any patch size gets positions without
  interpolating a table); RoPE rotates queries/keys of patch tokens only, never cls/registers.
  ``pos_embed="learned"`` keeps a ``[1, N, D]`` table for the patch tokens of the reference grid
  (``img_size / patch_size``), bicubically resampled for other grids (timm's ``resample_abs_pos_embed``).
- Blocks: ``PlutoBlock``, i.e. timm's ``EvaBlock`` (pre-norm, fused SDPA attention, LayerScale, MLP
  or packed SwiGLU FFN, stochastic depth) with RoPE applied to q and k in one fused pass. EVA
  attention has no key bias: it would add the same value to every logit of a query row, which
  softmax ignores. The RoPE table of a grid is built once per (grid, device) and reused by every
  block and step (rebuilt each forward only while timm's train-time coordinate augmentation is on).
- Masking (iBOT): ``masks [B, N]`` replaces the masked patch embeddings by ``mask_token`` before
  positions are added and before the blocks.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import LayerNorm, RotaryEmbeddingDinoV3, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from openpluto.errors import OpenPlutoError
from openpluto.model.config import ModelConfig
from openpluto.model.layers import FlexiPatchEmbed, PlutoBlock, rope_tables, sdpa_priority

POOLINGS = ("cls", "cls+mean")


class PlutoViT(nn.Module):
    """Vision transformer backbone; ``forward_features`` returns cls, register and patch tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.num_registers = cfg.num_registers
        self.num_prefix_tokens = 1 + cfg.num_registers
        self.patch_sizes = tuple(cfg.patch_sizes)
        self.default_patch_size = cfg.patch_size
        self.grad_checkpointing = False
        dim = cfg.embed_dim
        norm_layer = partial(LayerNorm, eps=cfg.eps)

        self.patch_embed = FlexiPatchEmbed(self.patch_sizes, cfg.kernel_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, dim)) if cfg.num_registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

        if cfg.pos_embed == "learned":
            grid = cfg.img_size // cfg.patch_size
            self.ref_grid = (grid, grid)
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
            self.rope = None
        else:
            self.ref_grid = None
            self.pos_embed = None
            self.rope = RotaryEmbeddingDinoV3(
                dim=cfg.head_dim,
                temperature=cfg.rope_temperature,
                rotate_half=True,
                rescale_coords=cfg.rope_rescale_coords,
            )

        # stochastic depth grows linearly from 0 (first block) to drop_path_rate (last block)
        drop_path = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            PlutoBlock(
                dim=dim,
                num_heads=cfg.num_heads,
                qkv_bias=cfg.qkv_bias,
                qkv_fused=True,
                mlp_ratio=cfg.mlp_ratio,
                swiglu_mlp=cfg.ffn == "swiglu",
                num_prefix_tokens=self.num_prefix_tokens,
                rotate_half=True,
                drop_path=drop_path[i],
                init_values=cfg.layerscale_init,
                norm_layer=norm_layer,
            )
            for i in range(cfg.depth)
        ])
        self.norm = norm_layer(dim)
        self._rope_cache: dict[tuple, torch.Tensor] = {}
        self.set_attention_backend(cfg.attn_backend)
        self.init_weights()

    # ------------------------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) linear layers and positions.

        With learned positions the cls/register tokens start tiny and the mask token at zero (DINOv2);
        with RoPE nothing is added to them before the first LayerNorm, so near-zero tokens would get
        ~1000x amplified gradients that swamp gradient clipping: they start at std 0.02 (DINOv3).
        """
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if self.reg_token is not None:
                nn.init.normal_(self.reg_token, std=1e-6)
            nn.init.zeros_(self.mask_token)
        else:
            for token in (self.cls_token, self.reg_token, self.mask_token):
                if token is not None:
                    trunc_normal_(token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=(1.0 / w[0].numel()) ** 0.5)  # LeCun normal over the stored kernel
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (tokens and the position table)."""
        names = {"cls_token", "mask_token"}
        if self.reg_token is not None:
            names.add("reg_token")
        if self.pos_embed is not None:
            names.add("pos_embed")
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
        self.grad_checkpointing = enable

    def set_attention_backend(self, name: str) -> None:
        """Put one SDPA backend first in every block: ``auto`` (PyTorch's choice), ``flash``, ``cudnn``,
        ``efficient`` or ``math`` (the others stay as fallbacks)."""
        backends = sdpa_priority(name)
        for blk in self.blocks:
            blk.sdpa_backends = backends

    def set_kernel_cache(self, enabled: bool = True) -> None:
        """Cache the PI-resized patch kernel when no gradient is wanted for it (frozen encoders)."""
        self.patch_embed.cache_kernels = enabled

    def _apply(self, fn, *args, **kwargs):
        self._rope_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------------------------ forward
    def _resolve_patch_size(self, patch_size: int | None) -> int:
        p = self.default_patch_size if patch_size is None else int(patch_size)
        if p not in self.patch_sizes:
            raise OpenPlutoError(
                f"patch size {p} is not one this model was built for {list(self.patch_sizes)} "
                f"(model '{self.cfg.name}')")
        return p

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The learned ``[1, h*w, D]`` table, resampled from the reference grid when needed."""
        assert self.pos_embed is not None and self.ref_grid is not None
        if grid == self.ref_grid:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=list(self.ref_grid),
                                      num_prefix_tokens=0)

    def prepare_tokens(
        self, x: torch.Tensor, patch_size: int | None = None, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Image ``[B, C, H, W]`` -> (tokens ``[B, 1+R+N, D]``, RoPE tables or None, grid ``(h, w)``)."""
        p = self._resolve_patch_size(patch_size)
        x = self.patch_embed(x, p)  # [B, h, w, D]
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)
        if masks is not None:
            if masks.shape != (B, h * w):
                raise OpenPlutoError(
                    f"masks have shape {tuple(masks.shape)} but the image has {B}x{h * w} patches "
                    f"({h}x{w} at patch size {p})")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        if self.pos_embed is not None:
            x = x + self._pos_embed_for((h, w))
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        rope = self.rope_table((h, w), x.device) if self.rope is not None else None
        return x, rope, (h, w)

    def rope_table(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """fp32 ``[2, 1+R+h*w, head_dim]`` (cos, signed sin; identity on cls/registers) for ``grid``,
        cached per (grid, device) unless timm's train-time coordinate augmentation is active."""
        assert self.rope is not None
        augmented = self.rope.training and self.rope.aug_active
        key = (grid, device)
        table = None if augmented else self._rope_cache.get(key)
        if table is None:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, reusable with autograd
                table = rope_tables(self.rope.get_embed(shape=list(grid)).float(), self.num_prefix_tokens)
                table = table.to(device)
            if not augmented:
                self._rope_cache[key] = table
        return table

    def forward_tokens(
        self, x: torch.Tensor, patch_size: int | None = None, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """All tokens after the final norm: ``[B, 1+R+N, D]`` and the grid ``(h, w)``."""
        x, rope, grid = self.prepare_tokens(x, patch_size, masks)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope=rope)
        return self.norm(x), grid

    def forward_features(
        self, x: torch.Tensor, patch_size: int | None = None, masks: torch.Tensor | None = None
    ) -> dict:
        """``x`` ``[B, C, H, W]`` (H, W divisible by the patch size; normalised with ``cfg.mean/std``) ->
        dict ``cls`` ``[B, D]``, ``registers`` ``[B, R, D]``, ``patch`` ``[B, N, D]``, ``grid`` ``(h, w)``."""
        x, grid = self.forward_tokens(x, patch_size, masks)
        r = self.num_prefix_tokens
        cls, registers, patch = x.split((1, r - 1, x.shape[1] - r), dim=1)  # backward: one concatenation
        return {"cls": cls.squeeze(1), "registers": registers, "patch": patch, "grid": grid}

    def forward(
        self, x: torch.Tensor, patch_size: int | None = None, masks: torch.Tensor | None = None
    ) -> dict:
        return self.forward_features(x, patch_size, masks)

    def embed(self, x: torch.Tensor, patch_size: int | None = None, pooling: str = "cls") -> torch.Tensor:
        """One vector per image: ``cls`` -> ``[B, D]``; ``cls+mean`` -> ``[B, 2D]`` (cls, mean patch)."""
        if pooling not in POOLINGS:
            raise OpenPlutoError(f"unknown pooling '{pooling}' (choose from {', '.join(POOLINGS)})")
        out = self.forward_features(x, patch_size)
        if pooling == "cls":
            return out["cls"]
        return torch.cat([out["cls"], out["patch"].mean(dim=1)], dim=-1)

    def embed_dim_for(self, pooling: str = "cls") -> int:
        """Length of the ``embed`` vector for ``pooling``."""
        if pooling not in POOLINGS:
            raise OpenPlutoError(f"unknown pooling '{pooling}' (choose from {', '.join(POOLINGS)})")
        return self.embed_dim * (2 if pooling == "cls+mean" else 1)

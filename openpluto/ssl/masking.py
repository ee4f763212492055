"""iBOT block masking as in DINOv2 (Zhou et al. 2022, iBOT; Bao et al. 2022, BEiT; Oquab et al. 2024).

Of ``n_images`` global crops, ``round(n_images * sample_probability)`` (at least one when the
probability is > 0) get a mask; their target masked shares are stratified: image i of the masked ones
draws its share uniformly from the i-th of equal slices of ``ratio_min_max`` (e.g. [0.1, 0.5]), so one
batch always spans the whole range. Each mask is built from random rectangles (area >= min_num_patches,
aspect in [min_aspect, 1/min_aspect], at most ``max_block_share`` of the grid) until the target count
is reached; on grids too small for blocks (e.g. 2x2 tokens at patch 32) the remainder is filled with
random single tokens, so a masked image always has ``clamp(round(share * N), 1, N)`` masked tokens.
The grid is that of the step's patch size: ``(G // patch_size, G // patch_size)``.
All randomness comes from the ``torch.Generator`` given (one draw seeds a Python RNG per call), so
masks are reproducible and resume exactly.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from openpluto.ssl.config import MaskConfig


def _add_block(mask: np.ndarray, max_new: int, cfg: MaskConfig, max_block: int, rng: random.Random) -> int:
    """Try (10 times) to mask one random rectangle adding 1..max_new tokens; return how many were added."""
    h, w = mask.shape
    log_aspect = (math.log(cfg.min_aspect), math.log(1.0 / cfg.min_aspect))
    for _ in range(10):
        hi = min(max_new, max_block)
        lo = min(cfg.min_num_patches, hi)
        area = rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(*log_aspect))
        bh = int(round(math.sqrt(area * aspect)))
        bw = int(round(math.sqrt(area / aspect)))
        if 0 < bh < h and 0 < bw < w:
            top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
            block = mask[top: top + bh, left: left + bw]
            new = bh * bw - int(block.sum())
            if 0 < new <= max_new:
                block[...] = True
                return new
    return 0


def _block_mask(h: int, w: int, n_masked: int, cfg: MaskConfig, rng: random.Random) -> np.ndarray:
    n = h * w
    n_masked = max(0, min(int(n_masked), n))
    mask = np.zeros((h, w), dtype=bool)
    max_block = max(1, int(cfg.max_block_share * n))
    count = 0
    while count < n_masked:
        added = _add_block(mask, n_masked - count, cfg, max_block, rng)
        if added == 0:
            break
        count += added
    if count < n_masked:  # grid too small for blocks: fill with random single tokens
        free = np.flatnonzero(~mask)
        mask.flat[rng.sample(free.tolist(), n_masked - count)] = True
    return mask


def _rng(generator: torch.Generator) -> random.Random:
    """A fast Python RNG seeded from (and advancing) the torch generator: reproducible and resumable."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))


def block_mask(
    grid_hw: tuple[int, int], n_masked: int, cfg: MaskConfig, generator: torch.Generator
) -> torch.Tensor:
    """One ``[h, w]`` bool mask with exactly ``n_masked`` True tokens, grown as random blocks."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    return torch.from_numpy(_block_mask(h, w, n_masked, cfg, _rng(generator)))


def sample_masks(
    n_images: int, grid_hw: tuple[int, int], cfg: MaskConfig, generator: torch.Generator
) -> torch.Tensor:
    """Masks of the student's global crops: BoolTensor ``[n_images, h*w]`` (True = masked), CPU.

    Masked shares are stratified over ``cfg.ratio_min_max`` across the masked images, which are a
    random ``sample_probability`` share of the ``n_images`` (the rest are all False).
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    n = h * w
    if n_images <= 0 or n == 0 or cfg.sample_probability <= 0:
        return torch.zeros(max(n_images, 0), n, dtype=torch.bool)
    n_masked_images = min(n_images, max(1, int(round(n_images * cfg.sample_probability))))
    lo, hi = cfg.ratio_min_max
    edges = np.linspace(lo, hi, n_masked_images + 1).tolist()
    # Bounds in tokens that keep the share inside [lo, hi] where the grid allows it.
    tok_lo = max(1, math.ceil(lo * n - 1e-9))
    tok_hi = max(tok_lo, math.floor(hi * n + 1e-9))
    rng = _rng(generator)
    order = list(range(n_images))
    rng.shuffle(order)
    masks = np.zeros((n_images, n), dtype=bool)
    for i in range(n_masked_images):
        share = rng.uniform(edges[i], edges[i + 1])
        n_tok = min(max(int(round(share * n)), tok_lo), tok_hi, n)
        masks[order[i]] = _block_mask(h, w, n_tok, cfg, rng).reshape(-1)
    return torch.from_numpy(masks)

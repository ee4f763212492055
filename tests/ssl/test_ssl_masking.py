"""iBOT block masks: stratified shares within bounds, masked-image count, grid per patch size, seeding."""

from __future__ import annotations

import pytest
import torch

from openpluto.ssl import MaskConfig, block_mask, sample_masks


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (8, 8), (14, 14)])  # 64 px at patch 32/16/8, 224 at 16
def test_shares_within_bounds_and_half_the_images(grid):
    cfg = MaskConfig()
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    for n_images in (1, 2, 5, 16):
        m = sample_masks(n_images, grid, cfg, g)
        assert m.dtype == torch.bool and m.shape == (n_images, n)
        share = m.float().mean(dim=1)
        masked = share > 0
        assert int(masked.sum()) == max(1, round(n_images * 0.5))
        lo = max(0.1, 1 / n)  # at least one token
        assert share[masked].min() >= lo - 1e-6
        assert share.max() <= 0.5 + 1e-6


def test_shares_are_stratified_over_the_range():
    cfg = MaskConfig()
    m = sample_masks(32, (14, 14), cfg, torch.Generator().manual_seed(3))
    share = m.float().mean(dim=1)
    s = torch.sort(share[share > 0]).values
    # 16 masked images, the i-th drawn from [0.1 + 0.025 i, 0.1 + 0.025 (i+1)] (up to rounding to tokens)
    edges = torch.linspace(0.1, 0.5, 17)
    assert ((s - edges[:-1]) >= -1 / 196 - 1e-6).all() and ((s - edges[1:]) <= 1 / 196 + 1e-6).all()


def test_same_seed_same_masks_and_other_seed_differs():
    cfg = MaskConfig()
    a = sample_masks(8, (8, 8), cfg, torch.Generator().manual_seed(7))
    b = sample_masks(8, (8, 8), cfg, torch.Generator().manual_seed(7))
    c = sample_masks(8, (8, 8), cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_mask_exact_count_and_blocky():
    cfg = MaskConfig()
    g = torch.Generator().manual_seed(0)
    m = block_mask((14, 14), 60, cfg, g)
    assert int(m.sum()) == 60
    # blocks, not salt-and-pepper: most masked tokens have a masked 4-neighbour
    padded = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
    neigh = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert (neigh[m] > 0).float().mean() > 0.9


def test_probability_zero_masks_nothing():
    cfg = MaskConfig(sample_probability=0.0)
    assert not sample_masks(4, (4, 4), cfg, torch.Generator()).any()

"""FlexiViT patch size of each step, drawn from a generator seeded by (seed, step).

Every rank computes the same draw from the same (seed, step), so no communication is needed and a
resumed run draws exactly the sizes of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openpluto.errors import ConfigError


def patch_size_for_step(
    step: int, sizes: Sequence[int], probs: Sequence[float] | None = None, seed: int = 0
) -> int:
    """Patch size (px) at ``step``: one draw from ``sizes`` with weights ``probs`` (uniform if None)."""
    sizes = list(sizes)
    if not sizes:
        raise ConfigError("train.patch_sizes is empty; give at least one patch size, e.g. [16]")
    if len(sizes) == 1:
        return int(sizes[0])
    w = (
        torch.ones(len(sizes), dtype=torch.float64)
        if probs is None
        else torch.tensor(probs, dtype=torch.float64)
    )
    if w.numel() != len(sizes) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ConfigError(
            f"train.patch_size_probs {list(probs or [])} must hold {len(sizes)} non-negative weights "
            "(one per patch size)"
        )
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return int(sizes[int(torch.multinomial(w, 1, generator=g))])

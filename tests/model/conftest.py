"""Small models for the model tests: every parameter (biases, tokens, LayerScale too) randomised."""

from __future__ import annotations

import pytest
import torch

from openpluto.model import PlutoViT, build_model


def randomise(model: PlutoViT, seed: int = 0) -> PlutoViT:
    """Give zero-initialised tensors (biases, tokens, LayerScale) random values so comparisons bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "token" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "gamma" in name else 0.0))
    return model.eval()


@pytest.fixture
def micro() -> PlutoViT:
    """vit_micro_flexi (RoPE, patch 8/16/32) with 2 registers, depth 2."""
    torch.manual_seed(0)
    return randomise(build_model("vit_micro_flexi", depth=2, num_registers=2))


@pytest.fixture
def micro_learned() -> PlutoViT:
    """Learned positions, SwiGLU FFN, 3 registers, patch 8/16/32, depth 2 (the pluto4g code path)."""
    torch.manual_seed(1)
    return randomise(build_model("vit_micro_flexi", depth=2, num_registers=3, pos_embed="learned",
                                 ffn="swiglu", mlp_ratio=2.0, img_size=64), seed=1)


@pytest.fixture
def randomised():
    """The ``randomise(model, seed)`` helper, for tests that build their own model."""
    return randomise

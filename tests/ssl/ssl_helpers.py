"""Small SSL settings, a micro backbone and random batches for fast CPU tests."""

from __future__ import annotations

import torch

from openpluto.ssl import CropConfig, HeadConfig, SSLConfig


def tiny_ssl_config(**loss_overrides) -> SSLConfig:
    """32 px global / 16 px local crops (patch sizes 8 and 16), 2 local crops, 64 prototypes."""
    cfg = SSLConfig(
        crops=CropConfig(global_size=32, local_size=16, n_global=2, n_local=2),
        heads=HeadConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, ibot_out_dim=48, ibot_hidden_dim=32,
                         ibot_bottleneck_dim=16),
    )
    for k, v in loss_overrides.items():
        setattr(cfg.loss, k, v)
    cfg.validate()
    return cfg


def micro_backbone(seed: int = 0):
    """The ``vit_micro_flexi`` preset, one block deep for speed."""
    from openpluto.model import build_model

    torch.manual_seed(seed)
    return build_model("vit_micro_flexi", depth=1)


def random_batch(cfg: SSLConfig, batch_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = cfg.crops
    return {
        "global_crops": torch.randn(c.n_global * batch_size, 3, c.global_size, c.global_size, generator=g),
        "local_crops": torch.randn(c.n_local * batch_size, 3, c.local_size, c.local_size, generator=g),
        "batch_size": batch_size,
    }

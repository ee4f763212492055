"""``build_model(name_or_cfg, **overrides)`` and ``list_models()``."""

from __future__ import annotations

from pathlib import Path

from openpluto.model.config import ModelConfig, list_model_presets, load_model_config
from openpluto.model.vit import PlutoViT


def list_models() -> list[str]:
    """Names accepted by ``build_model`` (the YAML presets in ``openpluto/model/presets``)."""
    return list_model_presets()


def build_model(name_or_cfg: str | Path | ModelConfig, **overrides) -> PlutoViT:
    """A randomly initialised PlutoViT from a preset name, a YAML file or a ``ModelConfig``.

    ``overrides`` are config fields, e.g. ``build_model("pluto4s", num_registers=0, depth=2)``; an
    unknown field or bad value raises a one-line ConfigError naming it. Build on the meta device with
    ``with torch.device("meta"): build_model("pluto4g")`` to count parameters without allocating them.
    """
    if isinstance(name_or_cfg, ModelConfig):
        from openpluto.config import from_dict, merge_dicts, to_dict

        cfg = name_or_cfg
        if overrides:
            cfg = from_dict(ModelConfig, merge_dicts(to_dict(cfg), overrides))
    else:
        cfg = load_model_config(name_or_cfg, overrides)
    return PlutoViT(cfg)

"""openpluto.model: the PLUTO-4 backbones (PlutoViT), presets, weights in/out and frozen encoders.

    from openpluto.model import build_model, load_encoder, save_pretrained, load_pretrained
    model = build_model("pluto4s")                        # FlexiViT 8/16/32, 2D RoPE, 4 registers
    out = model.forward_features(x, patch_size=8)         # dict cls [B,D], registers, patch [B,N,D], grid
    save_pretrained(model, "my_model")                    # config.json + model.safetensors
    enc = load_encoder("my_model")                        # frozen; or a preset, or "timm:NAME:PATH"
    maybe_compile(enc, True)                              # compiled blocks (the --compile switch)
"""

from openpluto.model.compile import maybe_compile
from openpluto.model.config import ModelConfig, list_model_presets, load_model_config
from openpluto.model.encoder import Encoder, load_encoder, parse_timm_spec
from openpluto.model.factory import build_model, list_models
from openpluto.model.hub import load_pretrained, read_config, save_pretrained
from openpluto.model.timm_export import export_timm, pluto_from_timm
from openpluto.model.vit import POOLINGS, PlutoViT

__all__ = [
    "POOLINGS",
    "Encoder",
    "ModelConfig",
    "PlutoViT",
    "build_model",
    "export_timm",
    "list_model_presets",
    "list_models",
    "load_encoder",
    "load_model_config",
    "load_pretrained",
    "maybe_compile",
    "parse_timm_spec",
    "pluto_from_timm",
    "read_config",
    "save_pretrained",
]

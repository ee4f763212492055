from __future__ import annotations

import pytest
import torch

from openpluto.errors import ConfigError
from openpluto.model import ModelConfig, PlutoViT, build_model, list_models, load_model_config


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_presets_listed_and_contract_fields():
    assert {"vit_micro_flexi", "vit_tiny_flexi", "pluto4s", "pluto4g"} <= set(list_models())
    micro = load_model_config("vit_micro_flexi")
    assert (micro.embed_dim, micro.depth, micro.num_heads, micro.num_registers) == (128, 4, 4, 0)
    assert micro.patch_sizes == (8, 16, 32) and micro.patch_size == 16 and micro.pos_embed == "rope"
    s = load_model_config("pluto4s")
    assert (s.embed_dim, s.depth, s.num_heads, s.patch_sizes, s.patch_size) == (384, 12, 6, (8, 16, 32), 16)
    g = load_model_config("pluto4g")
    assert (g.embed_dim, g.depth, g.num_heads, g.ffn, g.num_registers, g.patch_sizes, g.pos_embed) == (
        1536, 40, 24, "swiglu", 4, (14,), "learned")


def test_pluto4g_is_about_1_1b_params_on_meta_device():
    with torch.device("meta"):
        model = build_model("pluto4g")
    n = n_params(model)
    assert 1.10e9 < n < 1.16e9, n  # DINOv2 ViT-g/14: 1.1B
    # SwiGLU hidden width 4096 per branch, as DINOv2 ViT-g
    assert model.blocks[0].mlp.fc1.weight.shape == (2 * 4096, 1536)
    assert model.blocks[0].mlp.fc2.weight.shape == (1536, 4096)


def test_pluto4s_and_tiny_sizes():
    with torch.device("meta"):
        s = build_model("pluto4s")
        t = build_model("vit_tiny_flexi")
    assert 21e6 < n_params(s) < 22.5e6  # ViT-S
    assert 5.3e6 < n_params(t) < 5.9e6  # ViT-Ti (8x8 stored kernel, no position table)
    assert s.patch_embed.proj.weight.shape[-1] == 8  # stored kernel = smallest patch size


def test_pluto4g_code_path_at_reduced_size():
    model = build_model("pluto4g", depth=2, embed_dim=96, num_heads=4).eval()
    assert isinstance(model, PlutoViT) and model.num_registers == 4 and model.patch_sizes == (14,)
    x = torch.randn(2, 3, 14 * 3, 14 * 5)  # non-square, not the reference grid (learned pos resampled)
    out = model.forward_features(x)
    assert out["grid"] == (3, 5)
    assert out["cls"].shape == (2, 96) and out["registers"].shape == (2, 4, 96)
    assert out["patch"].shape == (2, 15, 96)
    assert model.embed(x, pooling="cls+mean").shape == (2, 192) == (2, model.embed_dim_for("cls+mean"))


def test_every_preset_forward_at_each_patch_size_small():
    model = build_model("vit_micro_flexi", depth=1).eval()
    x = torch.randn(1, 3, 64, 96)
    for p in model.patch_sizes:
        out = model.forward_features(x, patch_size=p)
        assert out["grid"] == (64 // p, 96 // p)
        assert out["patch"].shape == (1, (64 // p) * (96 // p), 128)
        assert torch.isfinite(out["patch"]).all()


def test_overrides_and_errors_name_the_key():
    model = build_model("vit_micro_flexi", num_registers=4, depth=1)
    assert model.reg_token.shape == (1, 4, 128) and model.cfg.num_registers == 4
    with pytest.raises(ConfigError, match="'depht'"):
        build_model("vit_micro_flexi", depht=3)
    with pytest.raises(ConfigError, match="'patch_size'"):
        build_model("vit_micro_flexi", patch_size=14)
    with pytest.raises(ConfigError, match="'num_heads'"):
        build_model("vit_micro_flexi", num_heads=3)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        build_model("nope")
    with pytest.raises(ConfigError, match="'ffn'"):
        build_model("vit_micro_flexi", ffn="moe")
    cfg = ModelConfig(embed_dim=64, num_heads=4, depth=1)
    assert build_model(cfg, depth=2).cfg.depth == 2


def test_wrong_patch_size_or_image_size_is_a_clear_error(micro):
    from openpluto.errors import OpenPlutoError

    with pytest.raises(OpenPlutoError, match="patch size 14"):
        micro.forward_features(torch.randn(1, 3, 64, 64), patch_size=14)
    with pytest.raises(OpenPlutoError, match="not divisible by patch size 32"):
        micro.forward_features(torch.randn(1, 3, 48, 64), patch_size=32)
    with pytest.raises(OpenPlutoError, match="pooling"):
        micro.embed(torch.randn(1, 3, 32, 32), pooling="max")


def test_no_weight_decay_and_grad_checkpointing(micro):
    assert {"cls_token", "mask_token", "reg_token"} <= micro.no_weight_decay()
    names = dict(micro.named_parameters())
    assert all(n in names for n in micro.no_weight_decay())
    x = torch.randn(2, 3, 32, 32)
    micro.train()
    ref = micro.forward_features(x)["cls"].sum()
    ref.backward()
    g_ref = micro.patch_embed.proj.weight.grad.clone()
    micro.zero_grad()
    micro.set_grad_checkpointing(True)
    out = micro.forward_features(x)["cls"].sum()
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(micro.patch_embed.proj.weight.grad, g_ref)

"""load_encoder: model dirs, presets and timm:NAME:PATH[:k=v] specs give frozen encoders."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from openpluto.errors import OpenPlutoError
from openpluto.io import sha256_file
from openpluto.model import load_encoder, parse_timm_spec, save_pretrained


def test_encoder_from_model_dir(micro, tmp_path):
    save_pretrained(micro, tmp_path / "m")
    enc = load_encoder(tmp_path / "m")
    assert enc.weights_hash == sha256_file(tmp_path / "m" / "model.safetensors")
    assert enc.name == "vit_micro_flexi" and enc.patch_sizes == (8, 16, 32) and enc.default_patch_size == 16
    assert enc.mean == micro.cfg.mean and enc.std == micro.cfg.std
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    x = torch.randn(2, 3, 64, 64)
    emb = enc.embed(x, patch_size=8, pooling="cls+mean")
    assert emb.shape == (2, enc.embed_dim_for("cls+mean")) == (2, 256)
    with torch.no_grad():
        ref = micro.forward_features(x, 8)
    torch.testing.assert_close(emb, torch.cat([ref["cls"], ref["patch"].mean(1)], -1))
    out = enc.forward_features(x)
    assert out["registers"].shape == (2, 2, 128) and out["grid"] == (4, 4)


def test_encoder_from_preset_warns_random_init(caplog):
    with caplog.at_level(logging.WARNING):
        enc = load_encoder("vit_micro_flexi")
    assert enc.weights_hash == "random-init"
    assert "RANDOM" in caplog.text
    assert enc.embed(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_encoder_from_timm_spec(tmp_path):
    torch.manual_seed(0)
    kw = dict(embed_dim=64, depth=2, num_heads=2, img_size=64, num_classes=0)
    ref = timm.create_model("vit_small_patch16_224", **kw).eval()
    path = tmp_path / "vit.safetensors"
    save_file(ref.state_dict(), str(path))
    opts = "embed_dim=64,depth=2,num_heads=2,img_size=64,mean=[0.5,0.5,0.5]"
    spec = f"timm:vit_small_patch16_224:{path}:{opts}"
    enc = load_encoder(spec)
    assert enc.weights_hash == sha256_file(path) and enc.mean == (0.5, 0.5, 0.5)
    assert enc.patch_sizes == (16,) and enc.embed_dim_for("cls") == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(x), ref(x))
        tokens = ref.forward_features(x)
    out = enc.forward_features(x)
    assert out["grid"] == (4, 4) and out["registers"].shape == (2, 0, 64)
    torch.testing.assert_close(out["patch"], tokens[:, 1:])
    with pytest.raises(OpenPlutoError, match="patch size 16 only"):
        enc.embed(x, patch_size=8)


def test_timm_spec_parsing_and_errors(tmp_path):
    assert parse_timm_spec("timm:vit_x:/a/b.pth") == ("vit_x", "/a/b.pth", {})
    assert parse_timm_spec("timm:vit_x:/a/b.pth:init_values=1e-5,dynamic_img_size=true,x=ab") == (
        "vit_x", "/a/b.pth", {"init_values": 1e-5, "dynamic_img_size": True, "x": "ab"})
    with pytest.raises(OpenPlutoError, match="not a timm model"):
        load_encoder("timm:no_such_model_xyz:/tmp/w.safetensors")
    with pytest.raises(OpenPlutoError, match="does not exist"):
        load_encoder(f"timm:vit_small_patch16_224:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(OpenPlutoError, match="not a model directory, a preset"):
        load_encoder("no_such_preset")
    (tmp_path / "d").mkdir()
    with pytest.raises(OpenPlutoError, match="config.json is missing"):
        load_encoder(tmp_path / "d")

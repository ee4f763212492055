"""export-timm: timm's own Eva / VisionTransformer give openpluto's outputs; import from timm works."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from openpluto.cli.main import main
from openpluto.model import load_encoder, save_pretrained
from openpluto.model.timm_export import create_timm_model, export_timm, pluto_from_timm


def _assert_parity(model, tm, patch_size, hw=(64, 96)):
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours, _ = model.forward_tokens(x, patch_size)
        theirs = tm.forward_features(x)
        assert theirs.shape == ours.shape
        assert (ours - theirs).abs().max() <= 1e-4
        assert (model.embed(x, patch_size) - tm(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("which,timm_cls", [("micro", "Eva"), ("micro_learned", "VisionTransformer")])
def test_export_parity_at_every_patch_size(which, timm_cls, request, tmp_path):
    model = request.getfixturevalue(which)
    for p in model.patch_sizes:
        out = export_timm(model, p, tmp_path / f"p{p}")
        meta = json.loads((out / "timm_model.json").read_text())
        assert meta["kwargs"]["patch_size"] == p and "timm.create_model(" in (out / "README.md").read_text()
        # exactly the call the README documents: create_model(name, pretrained_cfg_overlay=dict(file=...))
        tm = timm.create_model(meta["model_name"], pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                               **meta["kwargs"]).eval()
        assert type(tm).__name__ == timm_cls
        _assert_parity(model, tm, p)
    # local-dir:OUT reads every argument from config.json
    _assert_parity(model, timm.create_model(f"local-dir:{tmp_path / 'p16'}", pretrained=True).eval(), 16)


def test_export_without_layerscale_and_qkv_bias(tmp_path, randomised):
    from openpluto.model import build_model

    for pos in ("rope", "learned"):
        model = randomised(build_model("vit_micro_flexi", depth=1, pos_embed=pos, layerscale_init=None,
                                      qkv_bias=False, img_size=64))
        _assert_parity(model, create_timm_model(export_timm(model, 32, tmp_path / pos)), 32, (64, 64))


def test_cli_export_timm_and_encoder(tmp_path, capsys, randomised):
    from openpluto.model import build_model

    micro = randomised(build_model("vit_micro_flexi", depth=2, num_registers=2, img_size=64))  # small check
    save_pretrained(micro, tmp_path / "m")
    rc = main(["export-timm", str(tmp_path / "m"), "--patch-size", "8", "--out", str(tmp_path / "t")])
    assert rc == 0 and "max abs difference" in capsys.readouterr().out
    enc = load_encoder(tmp_path / "t")  # an export folder is a timm encoder
    x = torch.randn(1, 3, 32, 32)
    ref = load_encoder(tmp_path / "m").embed(x, 8, pooling="cls+mean")
    torch.testing.assert_close(enc.embed(x, pooling="cls+mean"), ref, atol=1e-4, rtol=0)
    assert main(["export-timm", str(tmp_path / "m"), "--patch-size", "12", "--out", str(tmp_path / "u")]) == 2
    assert "error: --patch-size 12" in capsys.readouterr().err
    assert main(["export-timm", str(tmp_path / "nope"), "--out", str(tmp_path / "u")]) == 2


def test_import_from_timm_vit_state_dict_on_disk(tmp_path):
    # a DINOv2-register-style timm ViT with a class pos-embed row, registers, LayerScale, k bias
    torch.manual_seed(0)
    tm = timm.create_model("vit_small_patch16_224", embed_dim=64, depth=2, num_heads=2, img_size=64,
                           reg_tokens=2, init_values=0.5, no_embed_class=False, num_classes=0,
                           dynamic_img_size=True, global_pool="token").eval()
    with torch.no_grad():
        for n, p in tm.named_parameters():
            if p.ndim <= 1 or "token" in n:
                p.normal_(0, 0.2)
    path = tmp_path / "timm_vit.safetensors"
    save_file(tm.state_dict(), str(path))
    model = pluto_from_timm(path, num_heads=2)
    assert model.cfg.pos_embed == "learned" and model.cfg.num_registers == 2 and model.cfg.img_size == 64
    x = torch.randn(2, 3, 64, 64)  # reference grid: the folded cls/register position rows are exact
    with torch.no_grad():
        ours, _ = model.forward_tokens(x)
        torch.testing.assert_close(ours, tm.forward_features(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="not a timm ViT state dict"):
        pluto_from_timm({"foo": torch.zeros(1)})


def test_import_from_dinov3_style_eva_roundtrip(micro, tmp_path):
    tm = create_timm_model(export_timm(micro, 16, tmp_path / "e"))
    path = tmp_path / "eva.safetensors"
    save_file(tm.state_dict(), str(path))
    model = pluto_from_timm(path, num_heads=4, patch_sizes=(16, 32))  # /16 kernel, also run at 32
    assert model.cfg.pos_embed == "rope" and model.cfg.num_registers == 2
    _assert_parity(model, tm, 16)
    assert model.forward_features(torch.randn(1, 3, 64, 64), 32)["grid"] == (2, 2)


def test_exported_timm_config_resizes_as_openpluto(micro, tmp_path):
    """A timm pipeline built from the exported config preprocesses a tile exactly as `embed-images`."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from openpluto.embed.images import load_image, normalise

    out = export_timm(micro, 16, tmp_path / "t")
    tm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_cfg = resolve_data_config({}, model=tm)
    assert data_cfg["interpolation"] == "bilinear" and data_cfg["crop_pct"] == 1.0
    rng = np.random.default_rng(0)
    tile = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))  # non-square, downscaled
    tile.save(tmp_path / "tile.png")
    ours = normalise(torch.from_numpy(load_image(str(tmp_path / "tile.png"), 224)).permute(2, 0, 1)[None],
                     micro.cfg.mean, micro.cfg.std)
    theirs = create_transform(**data_cfg)(tile)[None]
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert (ours - theirs).abs().max() < 1e-5
    bicubic = create_transform(**{**data_cfg, "interpolation": "bicubic"})(tile)[None]
    assert (ours - bicubic).abs().mean() > 0.05  # the filter is what would differ

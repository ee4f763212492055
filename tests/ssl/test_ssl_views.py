"""Multi-crop views, histology augmentation steps, collation and config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from openpluto.config import from_dict
from openpluto.errors import ConfigError
from openpluto.ssl import (
    AugmentConfig,
    BatchAugment,
    CropConfig,
    MultiCropTransform,
    SSLConfig,
    collate_multicrop,
    draw_params,
)
from openpluto.ssl.augment import apply_steps
from openpluto.ssl.image_ops import hed_jitter, hed_to_rgb, rgb_to_hed

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _tile(size=96, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _views(cfg: CropConfig, tiles, mean=MEAN, std=STD) -> dict:
    """Worker half + collation + batched augmentation on the CPU, as the trainer does."""
    batch = collate_multicrop([MultiCropTransform(cfg)(t) for t in tiles])
    return BatchAugment(cfg.augment, mean, std)(batch, "cpu")


def test_multicrop_shapes_dtype_and_normalisation():
    cfg = CropConfig(global_size=64, local_size=32, n_global=2, n_local=3)
    sample = MultiCropTransform(cfg)(_tile())
    assert [t.shape for t in sample["global_crops"]] == [(3, 64, 64)] * 2
    assert [t.shape for t in sample["local_crops"]] == [(3, 32, 32)] * 3
    assert all(t.dtype == torch.uint8 for t in sample["global_crops"] + sample["local_crops"])  # uint8
    assert sample["global_params"]["blur"].shape == (2,)
    assert sample["local_params"]["hed_scale"].shape == (3, 3)
    out = _views(cfg, [_tile(seed=0), _tile(seed=1)])
    assert out["global_crops"].shape == (4, 3, 64, 64) and out["local_crops"].shape == (6, 3, 32, 32)
    assert out["global_crops"].dtype == torch.float32 and out["batch_size"] == 2
    assert "global_params" not in out
    # normalised: 0..1 RGB maps into [-mean/std, (1-mean)/std]
    lo = min(-m / s for m, s in zip(MEAN, STD))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD))
    assert out["global_crops"].min() >= lo - 1e-4 and out["global_crops"].max() <= hi + 1e-4


def test_multicrop_accepts_arrays_and_grey_images():
    cfg = CropConfig(global_size=32, local_size=16, n_local=1)
    tr = MultiCropTransform(cfg)
    arr = np.zeros((40, 40, 3), np.uint8)
    assert tr(arr)["global_crops"][0].shape == (3, 32, 32)
    assert tr(Image.new("L", (40, 40)))["local_crops"][0].shape == (3, 16, 16)


def test_collate_is_crop_major():
    tr = MultiCropTransform(CropConfig(global_size=8, local_size=8, n_global=2, n_local=3))
    samples = []
    for i in range(4):
        s = tr(_tile(16, seed=i))
        s["global_crops"] = [torch.full((3, 4, 4), 10 * c + i, dtype=torch.uint8) for c in range(2)]
        s["local_crops"] = [torch.full((3, 2, 2), 100 + 10 * c + i, dtype=torch.uint8) for c in range(3)]
        s["global_params"]["hue"] = torch.tensor([10.0 * c + i for c in range(2)])
        s["position"] = 7 + i
        samples.append(s)
    b = collate_multicrop(samples)
    assert b["batch_size"] == 4 and b["position"] == [7, 8, 9, 10]
    assert b["global_crops"].shape == (8, 3, 4, 4) and b["local_crops"].shape == (12, 3, 2, 2)
    assert b["global_crops"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert b["global_params"]["hue"].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]  # parameters follow their crop
    assert b["local_crops"][:, 0, 0, 0].tolist() == [100 + 10 * c + i for c in range(3) for i in range(4)]
    assert b["local_params"]["color_order"].shape == (12, 3)


def test_collate_without_local_crops():
    tr = MultiCropTransform(CropConfig(global_size=8, local_size=8, n_global=1, n_local=0))
    b = collate_multicrop([tr(_tile(16)), tr(_tile(16))])
    assert b["local_crops"].numel() == 0 and b["global_crops"].shape == (2, 3, 8, 8)
    assert b["local_params"]["blur"].shape == (0,)
    out = BatchAugment(AugmentConfig(), MEAN, STD)(b, "cpu")
    assert out["local_crops"].numel() == 0 and out["global_crops"].dtype == torch.float32


def test_hed_roundtrip_and_jitter():
    x = torch.rand(2, 3, 16, 16) * 0.9 + 0.05
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-5)
    same = hed_jitter(x, torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.allclose(same, x, atol=1e-5)
    y = hed_jitter(x, torch.full((2, 3), 1.2), torch.full((2, 3), -0.1))
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.allclose(y, x)
    assert y.min() >= 0 and y.max() <= 1


def test_rot90_is_a_rotation():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(4, 3, 4, 4) / 16
    cfg = AugmentConfig(steps=("rot90",))
    p = draw_params(cfg, [0] * 4, torch.Generator().manual_seed(0))
    p["rot90"] = torch.tensor([0, 1, 2, 3])
    y = apply_steps(x, p, cfg)
    for k in range(4):
        assert torch.equal(y[k], torch.rot90(x[k], k, dims=(-2, -1)))


def test_steps_are_configurable():
    none = AugmentConfig(steps=())
    p = draw_params(none, [0, 1, "local"], torch.Generator().manual_seed(0))
    assert not any(p[k].any() for k in ("flip_h", "flip_v", "rot90", "hed", "color", "grayscale", "blur"))
    p = draw_params(AugmentConfig(), [0] * 200 + [1] * 200, torch.Generator().manual_seed(0))
    assert not p["solarize"][:200].any() and p["solarize"][200:].any()  # DINOv2: solarize 2nd crop only
    # without augmentation steps a crop covering the whole tile is just the resized, normalised tile
    cfg = CropConfig(global_size=32, local_size=16, n_global=1, n_local=0, global_scale=(1.0, 1.0),
                     augment=none)
    tile = _tile(32)
    out = _views(cfg, [tile], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))["global_crops"][0]
    ref = torch.from_numpy(np.array(tile)).permute(2, 0, 1).float() / 255
    assert torch.allclose(out, ref, atol=1e-6)


def test_unknown_step_and_bad_probability_raise_config_error():
    with pytest.raises(ConfigError, match="unknown step 'jpeg'"):
        from_dict(SSLConfig, {"crops": {"augment": {"steps": ["flip", "jpeg"]}}})
    with pytest.raises(ConfigError, match="color_p"):
        from_dict(SSLConfig, {"crops": {"augment": {"color_p": 1.5}}})


def test_crop_sizes_must_divide_by_every_patch_size():
    cfg = SSLConfig()  # 64 / 32 px
    cfg.check_patch_sizes((8, 16, 32))
    with pytest.raises(ConfigError, match="crops.local_size"):
        cfg.check_patch_sizes((8, 16, 64))
    big = SSLConfig.dinov2_like(16)
    big.check_patch_sizes((8, 16, 32))
    SSLConfig.dinov2_like(14).check_patch_sizes((14,))
    with pytest.raises(ConfigError, match="multiple of 224"):
        SSLConfig(crops=CropConfig(global_size=224, local_size=98)).check_patch_sizes((14, 16, 32))


def test_config_roundtrip_from_dict():
    cfg = from_dict(SSLConfig, {"crops": {"global_size": 96, "n_local": 6}, "loss": {"centering": "softmax"}})
    assert cfg.crops.global_size == 96 and cfg.crops.n_local == 6 and cfg.loss.centering == "softmax"
    with pytest.raises(ConfigError, match="loss.centering"):
        from_dict(SSLConfig, {"loss": {"centering": "mean"}})


def test_views_png_layout_and_mask_tint(tmp_path):
    from openpluto.ssl import MaskConfig
    from openpluto.ssl.preview import save_views_png

    cfg = CropConfig(global_size=32, local_size=16, n_global=2, n_local=2)
    tiles = [Image.new("RGB", (48, 48), (200, 200, 200)) for _ in range(2)]
    path = save_views_png(tiles, MultiCropTransform(cfg), tmp_path / "views.png", MEAN, STD,
                          MaskConfig(sample_probability=1.0), patch_size=8)
    img = Image.open(path)
    gap = 4
    assert img.size == (2 * (32 + gap) + 2 * (16 + gap) + gap, 2 * (32 + gap) + gap)
    first = np.asarray(img.convert("RGB"))[gap:gap + 32, gap:gap + 32].astype(int)
    # every global crop is masked (probability 1): some of its pixels are tinted red
    assert ((first[..., 0] - first[..., 1]) > 40).any()


def test_hue_rotation_keeps_grey_and_luma_and_inverts():
    from openpluto.ssl.image_ops import hue_rotation_matrix

    m = hue_rotation_matrix(0.05)
    grey = torch.full((3,), 0.4)
    assert torch.allclose(m @ grey, grey, atol=1e-6)  # no chroma: unchanged
    rgb = torch.tensor([0.7, 0.3, 0.5])
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert torch.allclose(luma @ (m @ rgb), luma @ rgb, atol=1e-6)
    assert not torch.allclose(m @ rgb, rgb, atol=1e-3)
    assert torch.allclose(hue_rotation_matrix(-0.05) @ (m @ rgb), rgb, atol=1e-5)
    assert torch.allclose(hue_rotation_matrix(1.0), torch.eye(3), atol=1e-5)  # a full turn

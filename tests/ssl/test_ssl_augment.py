"""Batched augmentation on the model's device against the per-crop path it replaced.

Exact where the parameters are the same (HED jitter, flips, rotations, grayscale, solarize), to float
rounding for the colour blends and the separable blur, and in distribution over many crops (parameter
draws, and the per-channel statistics of the augmented views: two-sample Kolmogorov-Smirnov tests on
fixed seeds, so the verdict never changes between runs).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference_augment as ref
import torch
from scipy.stats import ks_2samp
from torchvision.transforms.v2 import functional as TF

from openpluto.demo.synthetic import render_patch
from openpluto.ssl import AugmentConfig, MultiCropTransform, SSLConfig, collate_multicrop, draw_params
from openpluto.ssl.augment import apply_steps
from openpluto.ssl.image_ops import BRIGHTNESS, CONTRAST, SATURATION, hue_rotation_matrix


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny per-crop ops: one thread (on a loaded 2-core machine a parallel region of a
    small op can wait a whole scheduler slice for its second thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _he_crops(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 H&E-like crops ``[n, 3, size, size]`` (synthetic tissue, several classes)."""
    rng = np.random.default_rng(seed)
    names = ("tumour", "stroma", "lymphocytes", "adipose")
    tiles = [render_patch(names[i % len(names)], size, 0.5, rng) for i in range(n)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def _params(cfg: AugmentConfig, n: int, seed: int = 0, kind: int | str = 1) -> dict[str, torch.Tensor]:
    return draw_params(cfg, [kind] * n, torch.Generator().manual_seed(seed))


def _only(step: str, **kw) -> AugmentConfig:
    return AugmentConfig(steps=(step,), **kw)


def test_hed_jitter_equals_the_per_crop_path_exactly():
    cfg = _only("hed", hed_p=0.5, hed_sigma=0.1)
    crops = _he_crops(12)
    p = _params(cfg, 12)
    assert 0 < int(p["hed"].sum()) < 12  # some crops jittered, some not
    out = apply_steps(crops, p, cfg)
    x = TF.to_dtype(crops, torch.float32, scale=True)
    for i in range(12):
        want = ref.hed_jitter(x[i], p["hed_scale"][i], p["hed_shift"][i]) if p["hed"][i] else x[i]
        assert torch.equal(out[i], want), i
    alone = apply_steps(crops[3:4], {k: v[3:4] for k, v in p.items()}, cfg)
    assert torch.equal(alone[0], out[3])  # an image's view does not depend on its batch


def test_geometry_grayscale_and_solarize_equal_torchvision_exactly():
    cfg = AugmentConfig(steps=("flip", "rot90", "grayscale", "solarize"), grayscale_p=0.5,
                        solarize_p=(0.5, 0.5))
    crops = _he_crops(16)
    p = _params(cfg, 16, seed=1)
    out = apply_steps(crops, p, cfg)
    x = TF.to_dtype(crops, torch.float32, scale=True)
    for i in range(16):
        y = x[i]
        if p["flip_h"][i]:
            y = TF.horizontal_flip(y)
        if p["flip_v"][i]:
            y = TF.vertical_flip(y)
        y = torch.rot90(y, int(p["rot90"][i]), dims=(-2, -1))
        if p["grayscale"][i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        if p["solarize"][i]:
            y = TF.solarize(y, 0.5)
        assert torch.equal(out[i], y), i
    assert {int(k) for k in p["rot90"]} == {0, 1, 2, 3}


def test_color_jitter_and_blur_equal_torchvision_with_the_same_factors():
    cfg = AugmentConfig(steps=("color", "blur"), color_p=0.7, hue=0.05, blur_p=(0.6, 0.6))
    crops = _he_crops(16)
    p = _params(cfg, 16, seed=2)
    out = apply_steps(crops, p, cfg)
    x = TF.to_dtype(crops, torch.float32, scale=True)
    ops = {BRIGHTNESS: (TF.adjust_brightness, "brightness"), CONTRAST: (TF.adjust_contrast, "contrast"),
           SATURATION: (TF.adjust_saturation, "saturation")}
    for i in range(16):
        y = x[i]
        if p["color"][i]:
            for op in p["color_order"][i].tolist():
                fn, key = ops[op]
                y = fn(y, float(p[key][i]))
            y = ref.hue_rotate(y, float(p["hue"][i]))
        if p["blur"][i]:
            s = float(p["blur_sigma"][i])
            y = TF.gaussian_blur(y, [cfg.blur_kernel] * 2, [s, s])
        assert torch.allclose(out[i], y, atol=2e-6, rtol=0), (i, (out[i] - y).abs().max())


def test_hue_matrix_batched_equals_single():
    shifts = torch.tensor([-0.02, 0.0, 0.013])
    batched = hue_rotation_matrix(shifts)
    for i, s in enumerate(shifts.tolist()):
        assert torch.allclose(batched[i], hue_rotation_matrix(s), atol=1e-7)
        assert torch.allclose(batched[i], ref.hue_rotation_matrix(s), atol=1e-6)


def _within(count: int, n: int, p: float) -> bool:
    """``count`` successes of ``n`` is within 5 standard deviations of probability ``p``."""
    return abs(count - n * p) <= 5 * (n * p * (1 - p)) ** 0.5 + 1e-9


def test_parameter_draws_follow_the_configured_distributions():
    cfg = AugmentConfig()  # DINOv2-like probabilities, H&E colour strengths
    n = 6000
    kinds = [0] * n + [1] * n + ["local"] * n
    p = draw_params(cfg, kinds, torch.Generator().manual_seed(0))
    g0, g1, lo = slice(0, n), slice(n, 2 * n), slice(2 * n, 3 * n)
    for name, prob in (("flip_h", cfg.flip_p), ("flip_v", cfg.flip_p), ("hed", cfg.hed_p),
                       ("color", cfg.color_p), ("grayscale", cfg.grayscale_p)):
        assert _within(int(p[name].sum()), 3 * n, prob), name
    for part, blur, sol in ((g0, cfg.blur_p[0], cfg.solarize_p[0]), (g1, cfg.blur_p[1], cfg.solarize_p[1]),
                            (lo, cfg.blur_p_local, cfg.solarize_p_local)):
        assert _within(int(p["blur"][part].sum()), n, blur)
        assert _within(int(p["solarize"][part].sum()), n, sol)
    for k in range(4):  # rot90_p = 1: k uniform over {0, 1, 2, 3}
        assert _within(int((p["rot90"] == k).sum()), 3 * n, 0.25)
    orders = [tuple(o) for o in p["color_order"].tolist()]
    for perm in itertools.permutations(range(3)):  # ColorJitter's random order: 6 equally likely
        assert _within(orders.count(perm), 3 * n, 1 / 6), perm
    s = cfg.hed_sigma
    for name, lo_hi in (("hed_scale", (1 - s, 1 + s)), ("hed_shift", (-s, s)),
                        ("brightness", (1 - cfg.brightness, 1 + cfg.brightness)),
                        ("contrast", (1 - cfg.contrast, 1 + cfg.contrast)),
                        ("saturation", (1 - cfg.saturation, 1 + cfg.saturation)),
                        ("hue", (-cfg.hue, cfg.hue)), ("blur_sigma", tuple(cfg.blur_sigma))):
        v = p[name].double()
        width = lo_hi[1] - lo_hi[0]
        assert v.min() >= lo_hi[0] and v.max() <= lo_hi[1], name
        assert abs(float(v.mean()) - sum(lo_hi) / 2) < 0.02 * width, name  # uniform: mean in the middle
        assert abs(float(v.std()) - width / 12**0.5) < 0.02 * width, name
    off = draw_params(AugmentConfig(steps=("flip",)), [0] * 100, torch.Generator().manual_seed(0))
    assert not any(off[k].any() for k in ("hed", "color", "grayscale", "blur", "solarize"))
    assert not off["rot90"].any() and off["flip_h"].any()


def _channel_stats(views: torch.Tensor) -> list[np.ndarray]:
    """Per-crop mean and std of each channel: six samples of numbers."""
    mean = views.mean(dim=(-2, -1))
    std = views.std(dim=(-2, -1))
    return [t.numpy() for t in (*mean.unbind(1), *std.unbind(1))]


ALL_STEPS = ("flip", "rot90", "hed", "color", "grayscale", "blur", "solarize")


@pytest.mark.parametrize("steps,kind,stronger", [
    (("hed",), 1, {"hed_sigma": 0.16}),
    (("color",), 1, {"brightness": 0.4, "contrast": 0.4}),
    (("blur",), "local", {"blur_sigma": (0.15, 3.0)}),
    (ALL_STEPS, 0, None),
    (ALL_STEPS, 1, None),
])
def test_views_match_the_per_crop_path_in_distribution(steps, kind, stronger):
    base = {"hed_p": 0.8, "hed_sigma": 0.08, "color_p": 0.8, "hue": 0.05}
    cfg = AugmentConfig(steps=steps, **base)
    n = 800
    crops = _he_crops(1, size=24, seed=3).expand(n, -1, -1, -1).contiguous()  # one tile: only the
    # augmentation varies, so the statistics are sensitive to it
    new = apply_steps(crops, _params(cfg, n, seed=4, kind=kind), cfg)
    torch.manual_seed(5)
    per_crop = ref.build_steps(cfg, kind)
    old = _channel_stats(torch.stack([per_crop(TF.to_dtype(c, torch.float32, scale=True)) for c in crops]))
    for i, (a, b) in enumerate(zip(_channel_stats(new), old)):
        assert ks_2samp(a, b).pvalue > 0.01, (steps, i)
    if stronger:  # the test can tell: the same step twice as strong is another distribution
        other_cfg = AugmentConfig(steps=steps, **{**base, **stronger})
        other = apply_steps(crops, _params(other_cfg, n, seed=4, kind=kind), other_cfg)
        assert min(ks_2samp(a, b).pvalue for a, b in zip(_channel_stats(other), old)) < 1e-3


def test_worker_output_depends_only_on_the_rng_seed():
    cfg = SSLConfig().crops
    tile = render_patch("tumour", 96, 0.5, np.random.default_rng(0))
    tr = MultiCropTransform(cfg)
    torch.manual_seed(11)
    a = tr(tile)
    torch.rand(7)  # some other draw in between
    torch.manual_seed(11)
    b = tr(tile)
    assert all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"],
                                                  b["global_crops"] + b["local_crops"]))
    assert all(torch.equal(a[g][k], b[g][k]) for g in ("global_params", "local_params") for k in a[g])
    batch = collate_multicrop([a, b])
    assert batch["global_crops"].dtype == torch.uint8 and batch["global_params"]["hue"].shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_views_on_the_gpu_equal_the_cpu_views():
    """The batched steps give the same views on the GPU as on the CPU (to float rounding)."""
    from openpluto.ssl import BatchAugment

    cfg = SSLConfig().crops
    tiles = [render_patch("tumour", 96, 0.5, np.random.default_rng(i)) for i in range(8)]
    tr = MultiCropTransform(cfg)
    torch.manual_seed(0)
    batch = collate_multicrop([tr(t) for t in tiles])
    augment = BatchAugment(cfg.augment, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    cpu, gpu = augment(batch, "cpu"), augment(batch, "cuda")
    for key in ("global_crops", "local_crops"):
        assert gpu[key].device.type == "cuda"
        assert torch.allclose(gpu[key].cpu(), cpu[key], atol=1e-4), (gpu[key].cpu() - cpu[key]).abs().max()

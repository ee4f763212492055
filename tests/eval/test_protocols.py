"""Each protocol on synthetic data with known structure: separable -> ~1, noise -> chance."""

import numpy as np
import pytest
import torch

from openpluto.eval.abmil import GatedABMIL, pad_bags, train_abmil
from openpluto.eval.config import LinearConfig
from openpluto.eval.knn import knn_predict
from openpluto.eval.linear import ValidationMonitor, default_patience, train_linear_probe
from openpluto.eval.metrics import balanced_accuracy
from openpluto.eval.regression import ridge_fold
from openpluto.eval.segmentation import ConvDecoderWithImage, dice_loss, train_segmentation


def blobs(n_per_class, n_classes, dim, sep, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_classes, dim)) * sep
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(0, 1, (len(y), dim))
    return x.astype(np.float32), y


def split3(x, y, seed=0):
    idx = np.random.default_rng(seed).permutation(len(y))
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return (x[idx[:a]], y[idx[:a]]), (x[idx[a:b]], y[idx[a:b]]), (x[idx[b:]], y[idx[b:]])


FAST = dict(max_steps=300, patience=100, batch_size=64, lr=1e-2, val_every=25)


def test_linear_probe_separable_vs_noise_and_reproducible():
    x, y = blobs(80, 4, 16, sep=4.0, seed=0)
    tr, va, te = split3(x, y)
    res = train_linear_probe(tr, va, te, 4, seed=1, **FAST)
    assert res["balanced_accuracy"] > 0.95
    assert res["best_step"] <= res["steps"] <= 300
    again = train_linear_probe(tr, va, te, 4, seed=1, **FAST)
    assert again == res
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    tr, va, te = split3(noise, y)
    chance = np.mean(
        [train_linear_probe(tr, va, te, 4, seed=s, **FAST)["balanced_accuracy"] for s in range(3)]
    )
    assert chance < 0.45


def test_linear_probe_early_stops():
    x, y = blobs(50, 2, 8, sep=5.0, seed=2)
    tr, va, te = split3(x, y)
    res = train_linear_probe(tr, va, te, 2, seed=0, max_steps=5000, patience=20, batch_size=32, lr=1e-2)
    assert res["steps"] < 5000 and res["steps"] - res["best_step"] >= 20


def test_linear_probe_eva_defaults_binary_logit_and_patience_in_epochs():
    x, y = blobs(60, 2, 8, sep=3.0, seed=3)
    tr, va, te = split3(x, y)
    res = train_linear_probe(tr, va, te, 2, seed=0, max_steps=600, lr=1e-2)
    assert res["logits"] == 1 and res["balanced_accuracy"] > 0.9  # one logit + BCE for two classes
    assert train_linear_probe(*blobs_split(3, 5), 3, seed=0, max_steps=50)["logits"] == 3
    # eva: patience is 20% of the maximum epochs (12,500 steps at 2 steps per epoch -> 1,250 epochs)
    assert default_patience(12_500, 2) == 1_250 and default_patience(10, 1) == 2
    d = LinearConfig()
    assert (d.weight_decay, d.warmup_epochs, d.warmup_factor, d.patience) == (0.01, 5, 1 / 3, None)


def blobs_split(n_classes, seed):
    x, y = blobs(30, n_classes, 8, sep=3.0, seed=seed)
    return split3(x, y)


def test_linear_probe_warmup_scales_the_lr():
    tr, va, te = blobs_split(4, 4)
    kw = dict(max_steps=40, batch_size=32, lr=1e-2, val_every=40)  # 40 steps, all inside the warm-up
    learned = train_linear_probe(tr, va, te, 4, seed=0, warmup_epochs=100, warmup_factor=1.0, **kw)
    frozen = train_linear_probe(tr, va, te, 4, seed=0, warmup_epochs=100, warmup_factor=1e-6, **kw)
    assert learned["balanced_accuracy"] > 0.9 and frozen["balanced_accuracy"] < 0.6


def test_validation_monitor_smoothing_ignores_an_early_spike():
    scores = [0.9, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    eva = ValidationMonitor(smooth=1, patience=10)
    picked = [i for i, s in enumerate(scores) if eva.update(s)[0]]
    assert picked == [0]  # the spike at the first epoch wins and is never beaten
    smooth = ValidationMonitor(smooth=3, patience=10)
    picked = [i for i, s in enumerate(scores) if smooth.update(s)[0]]
    assert picked[-1] == 6 and 0 not in picked  # mean of 3 epochs: the plateau wins
    stops = ValidationMonitor(smooth=1, patience=3)
    assert [stops.update(s)[1] for s in (0.5, 0.4, 0.4, 0.4)] == [False, False, False, True]


def test_knn_weighted_votes_hand_case():
    # one very similar class-0 neighbour outweighs two less similar class-1 neighbours at T=0.07
    bank = np.array([[1.0, 0.0], [0.9, np.sqrt(1 - 0.81)], [0.9, -np.sqrt(1 - 0.81)]], np.float32)
    labels = np.array([0, 1, 1])
    scores = knn_predict(bank, labels, np.array([[2.0, 0.0]], np.float32), 2, k=3, temperature=0.07)
    assert scores[0, 0] == pytest.approx(np.exp(1 / 0.07), rel=1e-4)
    assert scores[0, 1] == pytest.approx(2 * np.exp(0.9 / 0.07), rel=1e-4)
    assert scores.argmax(1)[0] == 0
    # with a flat temperature the majority wins
    assert (
        knn_predict(bank, labels, np.array([[2.0, 0.0]], np.float32), 2, k=3, temperature=100).argmax(1)[0]
        == 1
    )


def test_knn_separable_vs_noise():
    x, y = blobs(60, 3, 16, sep=4.0, seed=3)
    tr, _, te = split3(x, y)
    pred = knn_predict(*tr, te[0], 3, k=20).argmax(1)
    assert balanced_accuracy(te[1], pred) > 0.95
    noise = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    tr, _, te = split3(noise, y)
    assert balanced_accuracy(te[1], knn_predict(*tr, te[0], 3).argmax(1)) < 0.6


def test_abmil_masking_ignores_padding():
    torch.manual_seed(0)
    model = GatedABMIL(6, 3).eval()
    bag = torch.randn(5, 6)
    x, m = pad_bags([bag, torch.randn(9, 6)])
    assert m.sum(1).tolist() == [5, 9]
    alone = model(bag[None], torch.ones(1, 5, dtype=torch.bool))[0]
    padded, attn = model(x, m)
    assert torch.allclose(alone[0], padded[0], atol=1e-6)
    assert attn[0, 5:].abs().sum() == 0 and torch.allclose(attn.sum(1), torch.ones(2))


def _bags(n_slides, signal, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n_slides) % 2
    bags = []
    for lab in labels:
        b = rng.normal(0, 1, (int(rng.integers(8, 20)), 8)).astype(np.float32)
        if signal and lab == 1:
            b[:3, 0] += 6.0  # a few positive tiles
        bags.append(b)
    splits = (["train"] * 3 + ["val", "test"]) * (n_slides // 5)
    return bags, labels, splits


def test_abmil_finds_positive_instances_and_noise_is_chance():
    bags, labels, splits = _bags(80, True, 0)
    kw = dict(max_epochs=25, patience=10, batch_size=16, lr=3e-3)
    res = train_abmil(bags, labels, splits, 2, seed=0, **kw)
    assert res["balanced_accuracy"] > 0.9 and res["macro_f1"] > 0.9
    assert train_abmil(bags, labels, splits, 2, seed=0, **kw) == res
    bags, labels, splits = _bags(80, False, 1)
    noise = np.mean(
        [train_abmil(bags, labels, splits, 2, seed=s, **kw)["balanced_accuracy"] for s in range(2)]
    )
    assert noise < 0.75


def test_segmentation_decoder_learns_and_shapes():
    # class 1 where the token map says so: tokens carry the answer at patch resolution
    rng = np.random.default_rng(0)
    n, g, p = 24, 4, 4
    grid = rng.integers(0, 2, (n, g, g))
    masks = torch.from_numpy(np.kron(grid, np.ones((p, p), dtype=np.int64)))
    tokens = torch.from_numpy(np.stack([grid, 1 - grid], 1).astype(np.float32)) + 0.1 * torch.randn(
        n, 2, g, g
    )
    images = torch.randn(n, 3, g * p, g * p) * 0.1
    dec = ConvDecoderWithImage(2, 2)
    assert dec(tokens[:2], images[:2]).shape == (2, 2, g * p, g * p)
    data = (tokens[:16], images[:16], masks[:16])
    res = train_segmentation(
        data,
        (tokens[16:], images[16:], masks[16:]),
        None,
        2,
        seed=0,
        lr=1e-2,
        batch_size=8,
        max_steps=40,
        val_every=20,
    )
    assert res["dice"] > 0.85
    perfect = torch.nn.functional.one_hot(masks[:4], 2).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, masks[:4]).item() < 1e-3


def test_regression_recovers_linear_signal_and_noise_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40)).astype(np.float32)
    w = rng.normal(size=(40, 5))
    y = np.expm1(np.clip(x @ w * 0.2 + 3 + rng.normal(0, 0.1, (300, 5)), 0, None))
    res = ridge_fold(x[:200], y[:200], x[200:], y[200:], n_components=256)
    assert res["n_components"] == 40  # capped by feature dims
    assert res["alpha"] == pytest.approx(100 / (40 * 5))
    assert res["pearson_mean"] > 0.9
    noise = ridge_fold(x[:200], rng.gamma(2, 2, (200, 5)), x[200:], rng.gamma(2, 2, (100, 5)))
    assert abs(noise["pearson_mean"]) < 0.2
    capped = ridge_fold(x[:20], y[:20], x[200:], y[200:], n_components=256)
    assert capped["n_components"] == 20

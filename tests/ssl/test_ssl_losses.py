"""Golden values of the DINO, iBOT and KoLeo losses (hand-computed small cases)."""

from __future__ import annotations

import math

import pytest
import torch

from openpluto.ssl import DINOLoss, IBOTPatchLoss, KoLeoLoss

LN3 = math.log(3.0)


def test_dino_single_pair_golden():
    # student logits / 0.1 = [0, ln 3] -> softmax [1/4, 3/4]; teacher [1/2, 1/2]
    s = torch.tensor([[[0.0, 0.1 * LN3]]])  # [S=1, B=1, K=2]
    t = torch.tensor([[[0.5, 0.5]]])
    loss = DINOLoss(student_temp=0.1)(s, t)
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_pairs_are_summed_and_same_view_skipped():
    # Two views, B=1. log p_0 = log[1/4, 3/4], log p_1 = log[3/4, 1/4]; P_0 = [1, 0], P_1 = [0, 1]
    s = torch.tensor([[[0.0, 0.1 * LN3]], [[0.1 * LN3, 0.0]]])
    t = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    loss = DINOLoss(0.1)
    ce = {(0, 0): -math.log(0.25), (0, 1): -math.log(0.75), (1, 0): -math.log(0.75), (1, 1): -math.log(0.25)}
    assert loss(s, t).item() == pytest.approx(sum(ce.values()), rel=1e-6)
    assert loss(s, t, skip_same=True).item() == pytest.approx(ce[(0, 1)] + ce[(1, 0)], rel=1e-6)


def test_dino_averages_over_batch():
    s = torch.zeros(1, 4, 3)  # uniform student: CE = ln 3 whatever the target
    t = torch.softmax(torch.randn(1, 4, 3), dim=-1)
    assert DINOLoss(0.1)(s, t).item() == pytest.approx(LN3, rel=1e-6)


def test_dino_is_float32_under_autocast():
    s = torch.randn(2, 3, 8).bfloat16()
    t = torch.softmax(torch.randn(2, 3, 8), -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DINOLoss(0.1)(s, t)
    assert out.dtype == torch.float32


def test_ibot_per_image_normalisation_golden():
    # 3 images of 2 tokens; image 0 has 1 masked token, image 1 has 2, image 2 none.
    masks = torch.tensor([[True, False], [True, True], [False, False]])
    s = torch.tensor([[0.0, 0.1 * LN3],  # p = [1/4, 3/4]
                      [0.0, 0.0],  # p = [1/2, 1/2]
                      [0.1 * LN3, 0.0]])  # p = [3/4, 1/4]
    t = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    ce = [math.log(4), math.log(2), math.log(4)]
    expected = (ce[0] / 1 + (ce[1] + ce[2]) / 2 + 0.0) / 3
    out = IBOTPatchLoss(0.1)(s, t, masks)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_ibot_no_masked_tokens_is_zero_and_differentiable():
    s = torch.zeros(0, 5, requires_grad=True)
    out = IBOTPatchLoss(0.1)(s, torch.zeros(0, 5), torch.zeros(2, 4, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0


def test_koleo_golden():
    # Unit vectors e1, (0.8, 0.6), e2: nearest distances sqrt(.4), sqrt(.4), sqrt(.8)
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    expected = -(2 * math.log(math.sqrt(0.4)) + math.log(math.sqrt(0.8))) / 3
    koleo = KoLeoLoss()
    assert koleo(x).item() == pytest.approx(expected, rel=1e-5)
    assert koleo(5.0 * x).item() == pytest.approx(expected, rel=1e-5)  # features are L2-normalised first


@pytest.mark.parametrize("rows", [1, 2])
def test_koleo_safe_for_tiny_batches(rows):
    # B=1: no neighbour -> exactly 0 with zero gradient; B=2 identical -> finite, zero gradient.
    x = torch.ones(rows, 8, requires_grad=True)
    out = KoLeoLoss()(x)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert x.grad.abs().max().item() == 0.0
    if rows == 1:
        assert out.item() == 0.0
    else:
        assert out.item() == pytest.approx(-math.log(2e-8), rel=1e-4)


def test_koleo_two_distinct_points_pushes_apart():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1]], requires_grad=True)
    out = KoLeoLoss()(x)
    d = torch.nn.functional.normalize(x.detach(), dim=-1)
    assert out.item() == pytest.approx(-math.log((d[0] - d[1]).norm().item()), rel=1e-5)
    out.backward()
    # gradient descent increases the angle: the second point's y moves up
    assert x.grad[1, 1] < 0

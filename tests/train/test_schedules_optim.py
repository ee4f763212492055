"""Schedules at known steps, per-step patch sizes, AdamW parameter groups."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from openpluto.errors import ConfigError
from openpluto.train.optim import apply_schedule, build_optimizer, layer_id, param_groups
from openpluto.train.patch_sizes import patch_size_for_step
from openpluto.train.schedules import Schedules, cosine, scaled_lr, warmup_cosine


def test_cosine_and_warmup_values_at_known_steps():
    assert cosine(0, 100, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(100, 100, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(500, 100, 1.0, 0.0) == 0.0
    # warm-up: linear from 0; peak exactly at the end of warm-up; min at the end of the run
    assert warmup_cosine(0, 110, 10, 1.0, 0.1) == 0.0
    assert warmup_cosine(5, 110, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(10, 110, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 110, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 110, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_sqrt_batch_scaling():
    assert scaled_lr(4e-3, 1024, 1024, "sqrt") == pytest.approx(4e-3)
    assert scaled_lr(4e-3, 256, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(4e-3, 256, 1024, "linear") == pytest.approx(1e-3)
    assert scaled_lr(4e-3, 256, 1024, "none") == 4e-3


def test_schedules_dinov2_style():
    s = Schedules(
        total_steps=1000,
        peak_lr=1e-3,
        min_lr=1e-6,
        warmup_steps=100,
        weight_decay=0.04,
        weight_decay_end=0.4,
        teacher_temp_start=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=300,
        momentum_start=0.992,
        momentum_end=1.0,
        freeze_last_layer_steps=50,
    )
    v0, v50, v150, v500, v1000 = s(0), s(50), s(150), s(500), s(1000)
    assert v0.lr == 0.0 and v50.lr == pytest.approx(5e-4)
    assert s(49).last_layer_lr == 0.0 and s(50).last_layer_lr == s(50).lr
    assert v0.teacher_temp == pytest.approx(0.04) and v150.teacher_temp == pytest.approx(0.055)
    assert v500.teacher_temp == pytest.approx(0.07)
    assert v0.momentum == pytest.approx(0.992) and v500.momentum == pytest.approx(0.996)
    assert v1000.momentum == pytest.approx(1.0)
    assert v0.weight_decay == pytest.approx(0.04) and v500.weight_decay == pytest.approx(0.22)
    assert v1000.lr == pytest.approx(1e-6)


def test_patch_size_is_a_function_of_the_step_and_follows_the_weights():
    sizes = (8, 16, 32)
    a = [patch_size_for_step(s, sizes, seed=3) for s in range(600)]
    b = [patch_size_for_step(s, sizes, seed=3) for s in range(600)]
    assert a == b  # every rank draws the same from (seed, step)
    assert set(a) == set(sizes)
    assert a != [patch_size_for_step(s, sizes, seed=4) for s in range(600)]
    c = Counter(patch_size_for_step(s, sizes, probs=(0.7, 0.2, 0.1)) for s in range(2000))
    assert c[8] > c[16] > c[32] > 0
    assert patch_size_for_step(5, (14,)) == 14
    with pytest.raises(ConfigError):
        patch_size_for_step(0, sizes, probs=(1.0, 0.0))


class _Backbone(nn.Module):
    def __init__(self, depth=3, dim=8):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)


class _Head(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.mlp = nn.Linear(dim, dim)
        self.last_layer = nn.Linear(dim, 16, bias=False)


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.dino_head = _Head()


def test_param_groups_weight_decay_layer_decay_and_last_layer():
    student = _Student()
    groups = param_groups(
        student, depth=3, layerwise_decay=0.5, patch_embed_lr_mult=0.2, no_wd_names=["backbone.cls_token"]
    )
    by_name = {n: g for g in groups for n in g["names"]}
    n_params = sum(1 for _ in student.parameters())
    assert len(by_name) == n_params
    # no weight decay on norms, biases, tokens; decay on matrices
    assert by_name["backbone.blocks.0.0.weight"]["wd_mult"] == 0.0
    assert by_name["backbone.blocks.0.1.bias"]["wd_mult"] == 0.0
    assert by_name["backbone.cls_token"]["wd_mult"] == 0.0
    assert by_name["backbone.blocks.0.1.weight"]["wd_mult"] == 1.0
    # layer-wise decay: block i -> 0.5 ** (depth + 1 - (i + 1)); heads/norm at 1; patch embed with extra x0.2
    assert by_name["backbone.blocks.0.1.weight"]["lr_mult"] == pytest.approx(0.5**3)
    assert by_name["backbone.blocks.2.1.weight"]["lr_mult"] == pytest.approx(0.5)
    assert by_name["dino_head.mlp.weight"]["lr_mult"] == pytest.approx(1.0)
    assert by_name["backbone.patch_embed.weight"]["lr_mult"] == pytest.approx(0.5**4 * 0.2)
    assert by_name["backbone.cls_token"]["lr_mult"] == pytest.approx(0.5**4)
    assert by_name["dino_head.last_layer.weight"]["is_last_layer"]
    assert layer_id("module.backbone.blocks.1.attn.qkv.weight", 3) == 2

    opt = build_optimizer(groups)
    apply_schedule(opt, lr=1.0, wd=0.1, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.0 if g["is_last_layer"] else g["lr_mult"])
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_mult"])
    # frozen last layer does not move, the rest does
    before = student.dino_head.last_layer.weight.detach().clone()
    before_mlp = student.dino_head.mlp.weight.detach().clone()
    out = student.dino_head.last_layer(student.dino_head.mlp(student.backbone.blocks[0](torch.randn(4, 8))))
    out.square().mean().backward()
    opt.step()
    assert torch.equal(before, student.dino_head.last_layer.weight)
    assert not torch.equal(before_mlp, student.dino_head.mlp.weight)
    assert math.isfinite(float(student.dino_head.mlp.weight.detach().sum()))

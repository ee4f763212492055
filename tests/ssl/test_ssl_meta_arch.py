"""SSLMetaArch: loss wiring, gradients, teacher handling, EMA update math, DDP-wrapped student."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from ssl_helpers import micro_backbone, random_batch, tiny_ssl_config

from openpluto.errors import ConfigError
from openpluto.ssl import CropConfig, SSLConfig, SSLMetaArch, sample_masks

PATCH_SIZES = (8, 16)  # 32 / 16 px crops


def _meta(seed=0, **loss) -> SSLMetaArch:
    return SSLMetaArch(micro_backbone(seed), tiny_ssl_config(**loss), patch_sizes=PATCH_SIZES)


@pytest.mark.parametrize("batch_size,patch_size", [(1, 16), (2, 8)])
def test_forward_keys_finite_float32(batch_size, patch_size):
    meta = _meta()
    out = meta(random_batch(meta.cfg, batch_size), patch_size, 0.04, torch.Generator().manual_seed(0))
    for key in ("dino_local", "dino_global", "ibot", "koleo", "total", "teacher_entropy", "student_feat_std"):
        assert out[key].dtype == torch.float32 and out[key].ndim == 0 and torch.isfinite(out[key]), key
    assert not out["teacher_entropy"].requires_grad and not out["student_feat_std"].requires_grad
    lc = meta.cfg.loss
    expected = (lc.dino_weight * (out["dino_local"] + out["dino_global"]) + lc.ibot_weight * out["ibot"]
                + lc.koleo_weight * out["koleo"])
    assert torch.allclose(out["total"], expected)
    if batch_size == 1:
        assert out["koleo"].item() == 0.0  # no neighbour within a crop on this rank


def test_losses_match_an_independent_computation():
    """Recompute the DINO/iBOT terms from the raw student/teacher outputs with plain formulas."""
    meta = _meta(centering="softmax")
    B, ps, temp, tau = 2, 16, 0.07, meta.cfg.loss.student_temp
    batch = random_batch(meta.cfg, B, seed=3)
    masks = sample_masks(2 * B, (2, 2), meta.cfg.masks, torch.Generator().manual_seed(5))
    batch["masks"] = masks
    out = meta(batch, ps, temp, torch.Generator(), update_centers=False)
    with torch.no_grad():
        t = meta.teacher(batch["global_crops"], None, masks, ps, mask_inputs=False)
        s = meta.student(batch["global_crops"], batch["local_crops"], masks, ps)
    pt = torch.softmax(t["global_dino"] / temp, -1).view(2, B, -1)  # centre is still 0
    ls_g = torch.log_softmax(s["global_dino"] / tau, -1).view(2, B, -1)
    ls_l = torch.log_softmax(s["local_dino"] / tau, -1).view(2, B, -1)

    def ce(p, logp):
        return -(p * logp).sum(-1).mean()

    n_pairs = 2 * 2 + 2 * 1
    local = sum(ce(pt[i], ls_l[j]) for i in range(2) for j in range(2)) / n_pairs
    glob = (ce(pt[0], ls_g[1]) + ce(pt[1], ls_g[0])) / n_pairs
    assert out["dino_local"].item() == pytest.approx(local.item(), rel=1e-5)
    assert out["dino_global"].item() == pytest.approx(glob.item(), rel=1e-5)
    pi = torch.softmax(t["ibot"] / temp, -1)
    per_tok = -(pi * torch.log_softmax(s["ibot"] / tau, -1)).sum(-1)
    img_of_tok = masks.nonzero()[:, 0]
    ibot = sum(per_tok[img_of_tok == i].mean() for i in range(2 * B) if masks[i].any()) / (2 * B)
    assert out["ibot"].item() == pytest.approx(ibot.item(), rel=1e-5)


def test_gradients_reach_every_student_parameter_and_never_the_teacher():
    meta = _meta()
    meta.train()
    assert meta.student.training and not meta.teacher.training
    out = meta(random_batch(meta.cfg, 2), 8, 0.04, torch.Generator().manual_seed(0))
    out["total"].backward()
    missing = [n for n, p in meta.student.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing  # DDP without find_unused_parameters needs every one
    assert all(not p.requires_grad and p.grad is None for p in meta.teacher.parameters())


def test_teacher_is_a_deep_copy_and_heads_shared_or_separate():
    meta = _meta()
    assert meta.teacher.backbone is not meta.student.backbone
    for (n, p), (_, q) in zip(meta.student.named_parameters(), meta.teacher.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    assert not hasattr(meta.student, "ibot_head")
    cfg = tiny_ssl_config()
    cfg.heads.ibot_separate_head = True
    sep = SSLMetaArch(micro_backbone(), cfg, patch_sizes=PATCH_SIZES)
    assert sep.student.ibot_head.last_layer.weight.shape == (48, 16)
    out = sep(random_batch(cfg, 2), 16, 0.04, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["total"])
    assert sep.ibot_center.center.shape == (1, 48)


def test_softmax_centering_updates_only_when_asked():
    meta = _meta(centering="softmax")
    batch = random_batch(meta.cfg, 2)
    meta(batch, 16, 0.04, torch.Generator().manual_seed(0), update_centers=False)
    assert meta.dino_center.center.abs().sum() == 0
    meta(batch, 16, 0.04, torch.Generator().manual_seed(0))
    assert meta.dino_center.center.abs().sum() > 0 and meta.ibot_center.center.abs().sum() > 0
    assert "dino_center.center" in meta.state_dict()


def test_bad_sizes_raise_config_error():
    with pytest.raises(ConfigError, match="crops.local_size"):
        SSLMetaArch(micro_backbone(), tiny_ssl_config())  # 16 px local crops, backbone has patch 32
    meta = _meta()
    with pytest.raises(ConfigError, match="not divisible by patch size 32"):
        meta(random_batch(meta.cfg, 1), 32, 0.04, torch.Generator())


def test_ema_update_math():
    meta = _meta()
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in meta.teacher.named_parameters()}
    student = dict(meta.student.named_parameters())
    meta.update_teacher(0.9)
    for n, p in meta.teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * student[n], atol=1e-6), n
    meta.update_teacher(0.0)
    assert all(torch.equal(p, student[n]) for n, p in meta.teacher.named_parameters())


def test_ema_update_through_a_ddp_wrapped_student(tmp_path):
    """Real DDP (gloo, world size 1): forward, backward and EMA through ``meta.student = DDP(...)``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        meta = _meta()
        plain = meta.student
        meta.student = DDP(plain, bucket_cap_mb=360, gradient_as_bucket_view=True)
        out = meta(random_batch(meta.cfg, 2), 16, 0.04, torch.Generator().manual_seed(0))
        out["total"].backward()
        with torch.no_grad():
            for p in plain.parameters():
                p.sub_(0.1 * p.grad)
        before = copy.deepcopy(meta.teacher)
        meta.update_teacher(0.5)
        for (n, t), (_, t0), (_, s) in zip(meta.teacher.named_parameters(), before.named_parameters(),
                                           plain.named_parameters()):
            assert torch.allclose(t, 0.5 * t0 + 0.5 * s, atol=1e-6), n
    finally:
        dist.destroy_process_group()


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = tiny_ssl_config()
    cfg.crops = CropConfig(global_size=32, local_size=16, n_global=2, n_local=2)
    meta = SSLMetaArch(micro_backbone(1), cfg, patch_sizes=PATCH_SIZES)
    meta.train()
    opt = torch.optim.AdamW([p for p in meta.student.parameters() if p.requires_grad], lr=2e-3)
    batch = random_batch(cfg, 2, seed=1)
    losses = []
    for step in range(5):
        out = meta(batch, 16, 0.04, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        meta.update_teacher(0.9)
        losses.append(out["dino_local"].item() + out["dino_global"].item())
    assert losses[-1] < losses[0]


def test_default_config_fits_the_flexi_backbone():
    SSLMetaArch(micro_backbone(), SSLConfig())  # 64 / 32 px crops, patch sizes 8/16/32


def test_ema_update_with_fully_sharded_student_and_teacher(tmp_path):
    """FSDP2 (gloo, world size 1): after a no-grad teacher forward its root stays unsharded; the EMA
    must still land in the DTensor shards (update_teacher reshards first)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        meta = _meta()
        mesh = init_device_mesh("cpu", (1,))
        for net in (meta.student, meta.teacher):
            for block in net.backbone.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(net, mesh=mesh)
        out = meta(random_batch(meta.cfg, 2), 16, 0.04, torch.Generator().manual_seed(0))
        out["total"].backward()
        before = {n: p.full_tensor().clone() for n, p in meta.student.named_parameters()}  # == teacher
        with torch.no_grad():
            for p in meta.student.parameters():
                p.sub_(0.1 * p.grad)
        meta.update_teacher(0.5)
        student = dict(meta.student.named_parameters())
        for n, p in meta.teacher.named_parameters():
            assert isinstance(p, DTensor), n
            expected = 0.5 * before[n] + 0.5 * student[n].full_tensor()
            assert torch.allclose(p.full_tensor(), expected, atol=1e-6), n
    finally:
        dist.destroy_process_group()


def test_losses_stay_float32_under_bf16_autocast():
    meta = _meta()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = meta(random_batch(meta.cfg, 2), 16, 0.04, torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in out.values())
    assert torch.isfinite(out["total"])
    out["total"].backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_step_on_the_gpu_under_bf16_matches_the_cpu():
    """bf16 autocast on the GPU: float32 losses close to the CPU fp32 ones, gradients finite."""
    meta = _meta()
    batch = random_batch(meta.cfg, 2, seed=4)
    masks = sample_masks(4, (4, 4), meta.cfg.masks, torch.Generator().manual_seed(1))
    ref = meta({**batch, "masks": masks}, 8, 0.04, update_centers=False)
    gpu = copy.deepcopy(meta).cuda()
    on_gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu({**on_gpu, "masks": masks}, 8, 0.04, update_centers=False)
    out["total"].backward()
    for key in ("dino_local", "dino_global", "ibot", "koleo", "total"):
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(ref[key].item(), rel=0.05, abs=0.05), key
    assert all(torch.isfinite(p.grad).all() for p in gpu.student.parameters() if p.grad is not None)

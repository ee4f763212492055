"""Sinkhorn-Knopp (sums, golden case, distributed == local on the global batch) and softmax centering."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from openpluto.ssl import SoftmaxCentering, sinkhorn_knopp


def test_sk_golden_doubly_stochastic_input():
    # exp(t / temp) = [[3, 1], [1, 3]] is already balanced: Q = that matrix normalised, rows sum 1.
    temp = 0.05
    t = temp * torch.log(torch.tensor([[3.0, 1.0], [1.0, 3.0]]))
    q = sinkhorn_knopp(t, temp, n_iterations=3)
    assert torch.allclose(q, torch.tensor([[0.75, 0.25], [0.25, 0.75]]), atol=1e-6)


def test_sk_uniform_logits_give_uniform_targets():
    q = sinkhorn_knopp(torch.zeros(5, 7), 0.04)
    assert torch.allclose(q, torch.full((5, 7), 1 / 7), atol=1e-7)


def test_sk_row_and_column_sums():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(12, 6, generator=g)
    q3 = sinkhorn_knopp(t, 0.5, n_iterations=3)
    assert q3.dtype == torch.float32 and (q3 >= 0).all()
    assert torch.allclose(q3.sum(dim=1), torch.ones(12), atol=1e-5)  # each sample: a distribution
    q = sinkhorn_knopp(t, 0.5, n_iterations=200)
    assert torch.allclose(q.sum(dim=0), torch.full((6,), 12 / 6), atol=1e-3)  # prototypes used equally
    # more balanced than a plain softmax
    plain = torch.softmax(t / 0.5, dim=-1).sum(dim=0)
    assert (q3.sum(dim=0) - 2).abs().max() < (plain - 2).abs().max()


def test_sk_finite_for_huge_logits_and_bf16():
    t = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 1000.0, 5.0]]).bfloat16()
    q = sinkhorn_knopp(t, 0.04)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()


def test_softmax_centering_update_math():
    c = SoftmaxCentering(3, momentum=0.9)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    p = c(t, temp=1.0)  # centre is 0 at first
    assert torch.allclose(p, torch.softmax(t, dim=-1))
    c.update(t)
    assert torch.allclose(c.center, torch.tensor([[0.2, 0.2, 0.2]]))  # 0.9*0 + 0.1*[2,2,2]
    c.update(torch.tensor([[0.0, 10.0, 0.0]]))
    assert torch.allclose(c.center, torch.tensor([[0.18, 0.18 + 1.0, 0.18]]))
    shifted = c(t, temp=0.5)
    assert torch.allclose(shifted, torch.softmax((t - c.center) / 0.5, dim=-1))
    assert math.isclose(shifted.sum(dim=1)[0].item(), 1.0, rel_tol=1e-6)


def _sk_worker(rank: int, world: int, init_file: str, t: torch.Tensor, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = t.shape[0] // world
        q = sinkhorn_knopp(t[rank * half:(rank + 1) * half], 0.1, n_iterations=3)
        out[rank] = q
    finally:
        dist.destroy_process_group()


def test_sk_distributed_equals_local_on_global_batch(tmp_path):
    """2 gloo ranks holding half the batch each get exactly the rows of the single-process answer."""
    t = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    manager = mp.Manager()
    out = manager.dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_sk_worker, args=(r, 2, str(tmp_path / "pg"), t, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    if any(p.exitcode != 0 for p in procs):
        pytest.fail(f"worker exit codes {[p.exitcode for p in procs]}")
    full = sinkhorn_knopp(t, 0.1, n_iterations=3)
    got = torch.cat([out[0], out[1]])
    assert torch.allclose(got, full, atol=1e-6)
    local_only = torch.cat([sinkhorn_knopp(t[:4], 0.1), sinkhorn_knopp(t[4:], 0.1)])
    assert not torch.allclose(local_only, full, atol=1e-4)  # the all-reduce matters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sk_on_the_gpu_equals_the_cpu_and_bf16_logits_stay_float32():
    t = torch.randn(300, 4096, generator=torch.Generator().manual_seed(2)) * 0.3
    cpu = sinkhorn_knopp(t, 0.04)
    gpu = sinkhorn_knopp(t.cuda(), 0.04)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-6)
    half = sinkhorn_knopp(t.cuda().bfloat16(), 0.04)
    assert half.dtype == torch.float32 and torch.allclose(half.sum(dim=1), torch.ones(300, device="cuda"))

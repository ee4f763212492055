"""``maybe_compile``: compiled blocks give the eager numbers, and per-step patch sizes 8/16/32 compile
one graph per shape and grad mode during warm-up and nothing after it (counted by torch._dynamo)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from openpluto.model import build_model, maybe_compile
from openpluto.model.compile import is_compiled
from openpluto.model.encoder import PlutoEncoder


def unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _round(model, x, sizes=(8, 16, 32)) -> dict:
    """Training fwd+bwd and an eval forward at each patch size; returns outputs and grads."""
    out = {}
    for p in sizes:
        model.train()
        model.zero_grad(set_to_none=True)
        f = model.forward_features(x, p)
        f["patch"].square().mean().backward()
        out[f"train{p}"] = f["cls"].detach()
        out[f"grad{p}"] = model.blocks[0].attn.qkv.weight.grad.clone()
        model.eval()
        with torch.no_grad():
            out[f"eval{p}"] = model.forward_features(x, p)["patch"]
    return out


def _assert_close(a: dict, b: dict, atol: float) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_three_patch_sizes_three_shapes_per_mode_and_no_recompilation(fresh_dynamo, micro):
    eager = copy.deepcopy(micro)
    assert maybe_compile(micro, True, backend="aot_eager") is micro and is_compiled(micro)
    assert list(micro.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    x = torch.randn(2, 3, 32, 32)
    warm = _round(micro, x)
    # every block shares one graph per (patch size, grad mode): 3 sizes x {train, eval}
    assert unique_graphs() == 6
    again = _round(micro, x)
    assert unique_graphs() == 6  # nothing new after warm-up
    _assert_close(warm, _round(eager, x), atol=1e-5)
    _assert_close(again, warm, atol=1e-5)
    maybe_compile(micro, True, backend="aot_eager")  # idempotent
    _round(micro, x, sizes=(16,))
    assert unique_graphs() == 6


def test_compiled_blocks_under_activation_checkpointing_give_eager_gradients(fresh_dynamo, micro):
    eager = copy.deepcopy(micro)
    for m in (micro, eager):
        m.set_grad_checkpointing(True)
    maybe_compile(micro, True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    _assert_close(_round(micro, x, sizes=(16,)), _round(eager, x, sizes=(16,)), atol=1e-5)


def test_inductor_compiled_encoder_matches_eager_and_pads_the_last_batch(fresh_dynamo):
    """The real CPU backend (C++ inductor) on a tiny model; a short last batch reuses the graph."""
    torch.manual_seed(0)
    model = build_model("vit_micro_flexi", depth=1, embed_dim=32, num_heads=2, num_registers=1)
    eager = PlutoEncoder(copy.deepcopy(model), "tiny", "test")
    enc = maybe_compile(PlutoEncoder(model, "tiny", "test"), True)
    x = torch.randn(4, 3, 32, 32)
    want = eager.embed(x, 16, "cls+mean")
    torch.testing.assert_close(enc.embed(x, 16, "cls+mean"), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.embed(x[:3], 16), eager.embed(x[:3], 16), atol=1e-5, rtol=0)
    assert unique_graphs() == 1


@pytest.mark.slow
def test_inductor_training_at_three_patch_sizes_matches_eager(fresh_dynamo, micro):
    eager = copy.deepcopy(micro)
    maybe_compile(micro, True)
    x = torch.randn(2, 3, 32, 32)
    warm = _round(micro, x)
    assert unique_graphs() == 6
    _assert_close(warm, _round(eager, x), atol=1e-5)
    _round(micro, x)
    assert unique_graphs() == 6


def test_compiled_rope_kernel_on_cpu_equals_reference(fresh_dynamo, micro):
    """The standalone fused kernel (used in eager CUDA forwards), built by inductor for the CPU."""
    from openpluto.model.layers import apply_rope
    from openpluto.model.layers.rope import compiled_rope_qk

    fused = compiled_rope_qk()
    for grid in ((4, 4), (2, 8), (8, 8)):  # dynamic shapes: one kernel for every grid
        T = micro.num_prefix_tokens + grid[0] * grid[1]
        qkv = torch.randn(3, T, 3, micro.cfg.num_heads, micro.cfg.head_dim)
        table = micro.rope_table(grid, torch.device("cpu"))
        got = fused(qkv[:, :, :2], table).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(got, apply_rope(qkv.permute(2, 0, 3, 1, 4)[:2], table), atol=1e-5, rtol=0)
    assert unique_graphs() <= 2

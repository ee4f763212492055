"""Fast paths of the backbone equal the reference: fused RoPE, cached RoPE tables and patch kernels."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

import openpluto.model.layers.block as block_mod
from openpluto.model import build_model
from openpluto.model.encoder import PlutoEncoder
from openpluto.model.layers import apply_rope, rope_qk, rope_qk_math


def fused_path():
    """Run the blocks' fused RoPE path (the CUDA / compiled one) eagerly on the CPU."""
    return mock.patch("torch.compiler.is_compiling", return_value=True)


def _qkv_and_table(model, grid=(5, 7), batch=2, dtype=torch.float32):
    T = model.num_prefix_tokens + grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, T, 3, model.cfg.num_heads, model.cfg.head_dim, generator=g).to(dtype)
    return qkv, model.rope_table(grid, torch.device("cpu"))


def test_fused_rope_math_equals_reference_fp32_and_bf16(micro):
    qkv, table = _qkv_and_table(micro)
    ref = apply_rope(qkv.permute(2, 0, 3, 1, 4)[:2], table)  # [2, B, H, T, hd]
    fused = rope_qk_math(qkv[:, :, :2], table).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(rope_qk(qkv[:, :, :2], table).permute(2, 0, 3, 1, 4), ref, atol=1e-5, rtol=0)
    # bf16 input: fp32 maths inside, one rounding at the end, like the reference's final cast
    qkv16, _ = _qkv_and_table(micro, dtype=torch.bfloat16)
    ref16 = apply_rope(qkv16.permute(2, 0, 3, 1, 4)[:2], table).to(torch.bfloat16)
    fused16 = rope_qk_math(qkv16[:, :, :2], table).permute(2, 0, 3, 1, 4)
    assert fused16.dtype == torch.bfloat16
    torch.testing.assert_close(fused16.float(), ref16.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fixture", ["micro", "micro_learned"])
def test_fused_block_path_equals_reference_forward_and_backward(fixture, request):
    model = request.getfixturevalue(fixture)
    x = torch.randn(2, 3, 32, 48)
    calls = []
    spy = mock.patch.object(block_mod, "rope_qk", side_effect=lambda *a: calls.append(1) or rope_qk(*a))

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        model.train()
        with spy, (fused_path() if fused else contextlib.nullcontext()):
            out = model.forward_features(x, 8)
            (out["patch"].square().mean() + out["cls"].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out["patch"].detach(), grads

    ref_out, ref_grads = run(False)
    assert not calls
    out, grads = run(True)
    assert calls or model.rope is None  # the fused path ran (RoPE models)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_rope_table_cached_per_grid_and_rebuilt_under_coordinate_augmentation(micro):
    cpu = torch.device("cpu")
    t1 = micro.rope_table((4, 6), cpu)
    assert micro.rope_table((4, 6), cpu) is t1  # one table for every block and step
    assert micro.rope_table((6, 4), cpu) is not t1
    micro.double()  # moving/casting the model drops the cache (tables stay fp32)
    t2 = micro.rope_table((4, 6), cpu)
    assert t2 is not t1 and t2.dtype == torch.float32
    torch.testing.assert_close(t2, t1)
    aug = build_model("vit_micro_flexi", depth=1, rope_rescale_coords=2.0).train()
    a, b = aug.rope_table((4, 4), cpu), aug.rope_table((4, 4), cpu)
    assert not torch.equal(a, b)  # a fresh random rescale each forward while training
    aug.eval()
    assert aug.rope_table((4, 4), cpu) is aug.rope_table((4, 4), cpu)


def _fresh_kernel(model, p):
    with torch.no_grad():
        return model.patch_embed._resize(model.patch_embed.proj.weight, p).clone()


def test_cached_kernel_equals_fresh_and_is_reused(micro):
    micro.set_kernel_cache(True)
    with torch.no_grad():
        k16 = micro.patch_embed.kernel(16)
        assert micro.patch_embed.kernel(16) is k16  # served from the cache
        k32 = micro.patch_embed.kernel(32)
    torch.testing.assert_close(k16, _fresh_kernel(micro, 16), atol=0, rtol=0)
    torch.testing.assert_close(k32, _fresh_kernel(micro, 32), atol=0, rtol=0)
    # gradients wanted: a differentiable kernel, never the cached one
    k = micro.patch_embed.kernel(16)
    assert k.requires_grad and k is not k16
    # eval forward with the cache equals the forward without it
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        cached = micro.forward_features(x, 16)["patch"]
        micro.set_kernel_cache(False)
        plain = micro.forward_features(x, 16)["patch"]
    torch.testing.assert_close(cached, plain, atol=0, rtol=0)


def test_cached_kernel_follows_optimizer_steps_and_load_state_dict(micro, randomised):
    micro.set_kernel_cache(True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = micro.patch_embed.kernel(16)
    opt = torch.optim.SGD(micro.parameters(), lr=0.5)
    micro.train()
    micro.forward_features(x, 16)["patch"].square().mean().backward()
    opt.step()
    micro.eval()
    with torch.no_grad():
        after_step = micro.patch_embed.kernel(16)
    assert not torch.equal(after_step, before)
    torch.testing.assert_close(after_step, _fresh_kernel(micro, 16), atol=0, rtol=0)

    other = randomised(build_model("vit_micro_flexi", depth=2, num_registers=2), seed=5)
    torch.nn.init.normal_(other.patch_embed.proj.weight)
    micro.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = micro.patch_embed.kernel(16)
    torch.testing.assert_close(loaded, _fresh_kernel(other, 16), atol=0, rtol=0)
    with torch.no_grad():  # and the outputs are those of the loaded weights
        torch.testing.assert_close(micro.forward_features(x, 16)["cls"],
                                   other.eval().forward_features(x, 16)["cls"], atol=1e-6, rtol=0)


def test_encoders_cache_kernels_and_pad_short_batches(micro):
    enc = PlutoEncoder(micro, "micro", "test")
    assert micro.patch_embed.cache_kernels
    x = torch.randn(5, 3, 32, 32)
    full = enc.embed(x, 16, "cls+mean")
    enc.pad_batches = True  # as after maybe_compile: a short batch runs at the largest batch size seen
    enc.embed(x, 16)
    with mock.patch.object(enc, "_features", wraps=enc._features) as spy:
        short = enc.embed(x[:3], 16, "cls+mean")
        out = enc.forward_features(x[:2], 16)
    assert [c.args[0].shape[0] for c in spy.call_args_list] == [5, 5]
    torch.testing.assert_close(short, full[:3], atol=1e-5, rtol=0)
    assert out["patch"].shape[0] == 2 and out["registers"].shape[0] == 2
    torch.testing.assert_close(out["cls"], full[:2, : micro.embed_dim], atol=1e-5, rtol=0)


def test_attention_backend_choice_keeps_the_maths(micro):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = micro.forward_features(x, 16)["patch"]
        for name in ("math", "flash", "cudnn"):
            micro.set_attention_backend(name)
            torch.testing.assert_close(micro.forward_features(x, 16)["patch"], ref, atol=1e-5, rtol=0)
    assert micro.blocks[0].sdpa_backends[0].name == "CUDNN_ATTENTION"
    micro.set_attention_backend("auto")
    assert micro.blocks[0].sdpa_backends is None


def test_pluto4g_swiglu_is_one_packed_matmul():
    with torch.device("meta"):
        g = build_model("pluto4g", depth=1)
    mlp = g.blocks[0].mlp
    assert mlp.fc1.out_features == 2 * int(1536 * g.cfg.mlp_ratio) == 8192
    assert not hasattr(mlp, "fc1_g")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_rope_and_model_match_the_cpu_reference_in_bf16(micro):
    qkv, table = _qkv_and_table(micro, grid=(14, 14), batch=4)
    ref = apply_rope(qkv.permute(2, 0, 3, 1, 4)[:2], table).to(torch.bfloat16).float()
    q16 = qkv.cuda().to(torch.bfloat16)
    fused = rope_qk(q16[:, :, :2], table.cuda()).permute(2, 0, 3, 1, 4).float().cpu()  # the compiled kernel
    torch.testing.assert_close(fused, ref, atol=3e-2, rtol=2e-2)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = micro.forward_features(x, 8)["patch"]
        gpu = micro.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = gpu.forward_features(x.cuda(), 8)["patch"].float().cpu()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)

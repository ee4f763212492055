"""Backbone throughput: openpluto PlutoViT vs timm's stock ViT of the same width/depth/patch, same run.

For each patch size: images/s of the forward pass (no grad) and of forward+backward, the achieved
GFLOP/s (analytic FLOPs of the transformer: patch embedding, qkv/proj, attention, FFN; backward
counted as 2x forward) and that as a fraction of a large matmul timed in the same run. openpluto and
timm alternate iteration by iteration (swapping who goes first), so both see the same machine load;
each number is the best of ``--iters`` timed iterations.

    python benchmarks/backbone_throughput.py                       # pluto4s, patch 8/16/32, batch 32, 224px
    python benchmarks/backbone_throughput.py --batch 8=8 --iters 3 # smaller batch at patch 8 (slow on CPU)

The timm model is ``VisionTransformer`` (as ``vit_small_patch16_224``) with openpluto's width, depth,
heads, FFN ratio and patch size, and the same number of register tokens, so both see the same
token count. CPU runs use fp32; ``--device cuda`` uses bf16 autocast. The forward rows run openpluto
as a frozen encoder does (PI-resized patch kernel cached, ``--no-kernel-cache`` turns that off);
``--compile`` compiles openpluto's blocks (``maybe_compile``; the warm-up iterations absorb it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

from openpluto.model import build_model, maybe_compile
from openpluto.model.flops import model_forward_flops


def matmul_gflops(device: str, dtype: torch.dtype, size: int = 2048, iters: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(iters + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * size ** 3 / statistics.median(times[1:]) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model, x, backward: bool, ours: bool, p: int, device: str, amp: bool) -> float:
    _sync(device)
    t = time.perf_counter()
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
        if backward:
            out = model.forward_features(x, p)["patch"] if ours else model.forward_features(x)
            out.float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                model.forward_features(x, p) if ours else model.forward_features(x)
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pluto4s", help="openpluto preset (default: pluto4s)")
    ap.add_argument("--patch-sizes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batch", action="append", default=[], metavar="PATCH=BATCH",
                    help="batch size for one patch size, e.g. 8=8 (repeatable)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per model and mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--no-kernel-cache", action="store_true", help="resize the patch kernel in every forward")
    ap.add_argument("--compile", action="store_true", help="compile openpluto's blocks (maybe_compile)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    amp = device.startswith("cuda")
    batch_for = {int(k): int(v) for k, v in (b.split("=") for b in args.batch)}
    peak = matmul_gflops(device, torch.bfloat16 if amp else torch.float32)
    print(f"device {device} ({'bf16 autocast' if amp else 'fp32'}), threads {torch.get_num_threads()}, "
          f"matmul 2048^3: {peak:.1f} GFLOP/s")

    rows = []
    for p in args.patch_sizes:
        bs = batch_for.get(p, args.batch_size)
        torch.manual_seed(0)
        ours = build_model(args.model, patch_sizes=sorted({p, *build_model_cfg(args.model).patch_sizes}),
                           img_size=args.img_size).to(device)
        ours.set_kernel_cache(not args.no_kernel_cache)
        maybe_compile(ours, args.compile)
        cfg = ours.cfg
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        kw = {}
        if cfg.ffn == "swiglu":
            from timm.layers import SwiGLUPacked

            kw = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2 * hidden / cfg.embed_dim)
        ref = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=args.img_size,
                                patch_size=p, embed_dim=cfg.embed_dim, depth=cfg.depth,
                                num_heads=cfg.num_heads,
                                mlp_ratio=kw.pop("mlp_ratio", cfg.mlp_ratio), reg_tokens=cfg.num_registers,
                                num_classes=0, **kw).to(device)
        x = torch.randn(bs, 3, args.img_size, args.img_size, device=device)
        tokens = (args.img_size // p) ** 2 + 1 + cfg.num_registers
        fl = model_forward_flops(cfg, args.img_size, p)
        row = {"patch": p, "batch": bs, "tokens": tokens, "gflop_per_image": fl / 1e9}
        for mode in (["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]):
            backward = mode == "fwd+bwd"
            for m in (ours, ref):
                m.train(backward)
            times = {"ours": [], "timm": []}
            for i in range(args.warmup + args.iters):
                pair = [("ours", ours), ("timm", ref)]
                for name, m in (pair if i % 2 == 0 else pair[::-1]):  # alternate who goes first
                    if backward:
                        m.zero_grad(set_to_none=True)
                    t = _step(m, x, backward, name == "ours", p, device, amp)
                    if i >= args.warmup:
                        times[name].append(t)
            mult = 3 if backward else 1
            for name in ("ours", "timm"):
                ips = bs / min(times[name])  # best of N: least disturbed by other processes
                row[f"{mode}_{name}_img_s"] = ips
                row[f"{mode}_{name}_gflop_s"] = ips * fl * mult / 1e9
            row[f"{mode}_ratio"] = row[f"{mode}_ours_img_s"] / row[f"{mode}_timm_img_s"]
        rows.append(row)
        del ours, ref, x

    print()
    print("| patch | batch | tokens | mode | openpluto img/s | timm img/s | ratio "
          "| openpluto GFLOP/s (% matmul) |")
    print("|" + "|".join("---" for _ in range(8)) + "|")
    for r in rows:
        for mode in (["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]):
            print(f"| {r['patch']} | {r['batch']} | {r['tokens']} | {mode} | {r[f'{mode}_ours_img_s']:.2f} | "
                  f"{r[f'{mode}_timm_img_s']:.2f} | {r[f'{mode}_ratio']:.3f} | "
                  f"{r[f'{mode}_ours_gflop_s']:.1f} ({100 * r[f'{mode}_ours_gflop_s'] / peak:.0f}%) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "matmul_gflop_s": peak, "model": args.model, "rows": rows}, f,
                      indent=2)


def build_model_cfg(name: str):
    from openpluto.model import load_model_config

    return load_model_config(name)


if __name__ == "__main__":
    main()

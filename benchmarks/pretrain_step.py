"""Where does a pretraining step go? Data, teacher forward, student forward/backward, losses, optimizer, EMA.

    python benchmarks/pretrain_step.py --config cpu-tiny --steps 10 --patch-size 16
    python benchmarks/pretrain_step.py --config pluto4s --batch-size 64 --patch-size 16   # on a GPU

Measured in one process on generated tiles:

- ``full step``: ``meta(batch)`` + backward + clip + AdamW + EMA (data excluded), as in the trainer;
- bare passes of the same batch: teacher backbone forward (no grad) and student backbone
  forward+backward on the global + local crops (loss = sum of CLS), i.e. the model compute a step
  cannot avoid; ``overhead = full / (teacher fwd + student fwd/bwd)`` (goal <= 1.2);
- the split of the full step: teacher SSLNet forward, student SSLNet forward+backward, losses and
  centering (the rest of ``meta`` forward/backward), optimizer (clip + AdamW), EMA update;
- data: the loader alone (``--workers``) in images/s against the images/s the step consumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None, help="tiles (default: generated synthetic tiles)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from openpluto.ssl import MultiCropTransform, collate_multicrop
    from openpluto.train.config import load_train_config
    from openpluto.train.data import build_loader, find_samples
    from openpluto.train.optim import apply_schedule, build_optimizer, param_groups
    from openpluto.train.trainer import build_meta

    extra = list(args.overrides) + ([f"data.batch_size={args.batch_size}"] if args.batch_size else [])
    cfg = load_train_config(args.config, extra)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = device.type == "cuda"
    data = args.data
    if data is None:
        from openpluto.demo.synthetic import make_synthetic_patch_dataset

        data = Path(tempfile.mkdtemp(prefix="bench_tiles_"))
        make_synthetic_patch_dataset(data, n_per_class=20, size=max(96, cfg.ssl.crops.global_size), seed=0)
    samples = find_samples(data)
    meta, backbone = build_meta(cfg, device)
    groups = param_groups(
        meta.student,
        len(backbone.blocks),
        cfg.optim.layerwise_decay,
        cfg.optim.patch_embed_lr_mult,
        [f"backbone.{n}" for n in backbone.no_weight_decay()],
    )
    opt = build_optimizer(groups, tuple(cfg.optim.betas))
    apply_schedule(opt, 1e-4, 0.04, 1e-4)
    params = [p for g in groups for p in g["params"]]
    tf = MultiCropTransform(cfg.ssl.crops, backbone.cfg.mean, backbone.cfg.std)
    B = cfg.data.batch_size

    def new_loader():
        return iter(build_loader(
            samples, tf, collate_multicrop, B, 0, 0, 1, 0, args.workers, 2, device.type == "cuda"
        ))

    it = new_loader()
    ps = args.patch_size
    ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    rows = []

    def full_step(batch, i):
        with ac:
            losses = meta(batch, ps, 0.05, torch.Generator().manual_seed(i))
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        meta.update_teacher(0.996)

    def meta_fwd_bwd(batch, i):
        with ac:
            losses = meta(batch, ps, 0.05, torch.Generator().manual_seed(i))
        losses["total"].backward()
        opt.zero_grad(set_to_none=True)

    def teacher_net(batch, i):
        with torch.no_grad(), ac:
            meta.teacher(batch["global_crops"], None, None, ps)

    def student_net(batch, i):
        with ac:
            out = meta.student(batch["global_crops"], batch["local_crops"], None, ps)
        sum(v.float().sum() for v in out.values()).backward()
        opt.zero_grad(set_to_none=True)

    def teacher_bare(batch, i):
        with torch.no_grad(), ac:
            meta.teacher.backbone.forward_features(batch["global_crops"], patch_size=ps)

    def student_bare(batch, i):
        with ac:
            a = meta.student.backbone.forward_features(batch["global_crops"], patch_size=ps)["cls"]
            b = meta.student.backbone.forward_features(batch["local_crops"], patch_size=ps)["cls"]
        (a.float().sum() + b.float().sum()).backward()
        opt.zero_grad(set_to_none=True)

    def optim_only(batch, i):
        for p in params:
            p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Batches are loaded before the timed steps, so that loader workers preparing the next batch do not
    # compete with the step for the CPU (on a 2-core machine they would double its time); the loader is
    # measured on its own below.
    loaded = []
    for _ in range(args.warmup + args.steps):
        batch, t_data = _timed(partial(next, it), device)
        loaded.append((batch, t_data))
    del it
    for i, (batch, t_data) in enumerate(loaded):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

        r = {"data": t_data}
        _, r["full"] = _timed(partial(full_step, batch, i), device)
        _, r["meta_fwd_bwd"] = _timed(partial(meta_fwd_bwd, batch, i), device)
        _, r["teacher_net"] = _timed(partial(teacher_net, batch, i), device)
        _, r["student_net"] = _timed(partial(student_net, batch, i), device)
        _, r["teacher_bare"] = _timed(partial(teacher_bare, batch, i), device)
        _, r["student_bare"] = _timed(partial(student_bare, batch, i), device)
        _, r["optim"] = _timed(partial(optim_only, batch, i), device)
        _, r["ema"] = _timed(partial(meta.update_teacher, 0.996), device)
        if i >= args.warmup:
            rows.append(r)
    med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
    med["losses_centering"] = max(med["meta_fwd_bwd"] - med["teacher_net"] - med["student_net"], 0.0)
    bare = med["teacher_bare"] + med["student_bare"]
    # data loader alone (a fresh loader, its start-up excluded)
    it = new_loader()
    next(it)
    n_batches = max(4, args.steps)
    t = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    loader_ips = n_batches * B / (time.perf_counter() - t)
    del it
    res = {
        "config": args.config,
        "device": str(device),
        "bf16": use_bf16,
        "batch_size": B,
        "patch_size": ps,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "full_over_bare": round(med["full"] / bare, 3),
        "step_images_per_s": round(B / med["full"], 1),
        "loader_images_per_s": round(loader_ips, 1),
    }
    print(
        f"{args.config} B={B} patch={ps} on {device} ({'bf16' if use_bf16 else 'fp32'}, "
        f"{torch.get_num_threads()} threads), median of {args.steps} steps:"
    )
    for k in (
        "data",
        "teacher_net",
        "student_net",
        "losses_centering",
        "optim",
        "ema",
        "full",
        "teacher_bare",
        "student_bare",
    ):
        print(f"  {k:18s} {med[k] * 1000:9.1f} ms")
    print(f"  full / bare model passes = {res['full_over_bare']:.2f}x (goal <= 1.2)")
    print(
        f"  loader {res['loader_images_per_s']:.0f} img/s ({args.workers} workers) vs step consumes "
        f"{res['step_images_per_s']:.0f} img/s"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

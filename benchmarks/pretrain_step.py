"""Where does a pretraining step go, and does the input pipeline keep up with it?

    python benchmarks/pretrain_step.py --config cpu-tiny --steps 10 --patch-size 16
    python benchmarks/pretrain_step.py --config pluto4s --batch-size 64 --patch-size 16 --device cuda
    python benchmarks/pretrain_step.py --config pluto4s --batch-size 64 --patch-size 32 --device cuda \\
        --workers 8 --loader-batches 30

Importable (``benchmarks/gpu_suite.py`` uses them):

- ``measure_step(preset, batch_size, patch_size, device, steps)``: the SSL step as the trainer runs it
  (``meta(batch)`` + backward + clip + AdamW + EMA; bf16 autocast on CUDA, fp32 on CPU) against the
  bare backbone passes of the same batch (teacher forward without grad + student forward/backward on
  the global and local crops, loss = sum of CLS): ``overhead = step_ms / bare_ms`` (issue #11 goal on a
  GPU: <= 1.15 at ``pluto4s``; on CPU ``cpu-tiny`` <= 1.2). Also the split of the step (teacher and
  student SSLNet: backbone + heads on the CLS and masked tokens; losses + centering, the rest of the
  SSL forward/backward; optimizer; EMA) and ``augment_ms``, the batched augmentation on the device
  that precedes each step.
- ``measure_loader(preset, batch_size, workers, device, batches)``: the training input pipeline alone
  (``workers`` DataLoader processes decoding, cropping uint8, drawing augmentation parameters and iBOT
  masks; pinned on CUDA) in images/s, against the images/s the step consumes (``B / (step + augment)``)
  at ``patch_size`` (default 32, the fastest step). Goal: ``images_per_s >= 1.5 * step_images_per_s``.

Both build their own data: an image folder of synthetic H&E tiles (JPEG, like ``openpluto tiles``
writes) from :mod:`openpluto.demo.synthetic`, so no slide library or webdataset is needed. Batches for
``measure_step`` are prepared before the timed steps, so that loader workers do not compete with the
step for the CPU (on a 2-core machine they would double its time).
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TILE_DIRS: dict[int, Path] = {}


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process)."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t, time.process_time() - c


def synthetic_tiles(tile_size: int, n_per_class: int = 8) -> Path:
    """A folder of ``6 * n_per_class`` synthetic H&E JPEG tiles of ``tile_size`` px (once per process)."""
    if tile_size in _TILE_DIRS:
        return _TILE_DIRS[tile_size]
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix=f"bench_tiles_{tile_size}_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    png = root / "png"
    try:
        from openpluto.demo.synthetic import make_synthetic_patch_dataset

        make_synthetic_patch_dataset(png, n_per_class=n_per_class, size=tile_size, seed=0)
        sources = sorted(png.rglob("*.png"))
    except ImportError:  # a bare machine without scipy: textured noise of the same size
        rng = np.random.default_rng(0)
        png.mkdir(parents=True)
        sources = []
        for i in range(6 * n_per_class):
            p = png / f"{i:04d}.png"
            Image.fromarray(rng.integers(60, 230, (tile_size, tile_size, 3), dtype=np.uint8)).save(p)
            sources.append(p)
    jpg = root / "tiles"
    jpg.mkdir()
    for i, p in enumerate(sources):
        with Image.open(p) as im:
            im.convert("RGB").save(jpg / f"{i:05d}.jpg", quality=90)
    _TILE_DIRS[tile_size] = jpg
    return jpg


def _config(preset: str, batch_size: int, overrides: Sequence[str] = ()):
    from openpluto.train.config import load_train_config

    return load_train_config(preset, [*overrides, f"data.batch_size={batch_size}"])


def _tile_size(cfg) -> int:
    """Tiles a little larger than the global crop (256 px for 224 px crops), as ``openpluto tiles`` cuts."""
    return max(96, round(cfg.ssl.crops.global_size * 8 / 7))


def _worker_collate(cfg, patch_size: int, batch_size: int):
    """The trainer's collate: crops + augmentation parameters + iBOT masks at ``patch_size``."""
    from openpluto.ssl import collate_multicrop
    from openpluto.train.data import StepMasks

    return StepMasks(collate_multicrop, cfg.ssl, (patch_size,), None, cfg.seed, 0, 1, batch_size, 1, 0, 0)


def _pinned(x: Any) -> Any:
    if torch.is_tensor(x):
        return x.pin_memory()
    if isinstance(x, dict):
        return {k: _pinned(v) for k, v in x.items()}
    return x


def _prepared_batches(cfg, patch_size: int, n: int, device: torch.device) -> list[dict]:
    """``n`` collated batches made in this process, exactly as loader workers make them."""
    from openpluto.ssl import MultiCropTransform
    from openpluto.train.data import PositionViews, find_samples

    B = cfg.data.batch_size
    samples = find_samples(synthetic_tiles(_tile_size(cfg)))
    views = PositionViews(samples, MultiCropTransform(cfg.ssl.crops), cfg.seed)
    collate = _worker_collate(cfg, patch_size, B)
    batches = [collate([views[p] for p in range(i * B, (i + 1) * B)]) for i in range(n)]
    return [_pinned(b) for b in batches] if device.type == "cuda" else batches


def measure_step(preset: str, batch_size: int, patch_size: int, device: str = "auto", steps: int = 10,
                 warmup: int = 2, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Median times (ms) of the SSL step and of the bare backbone passes; see the module docstring.

    Keys: ``step_ms``, ``bare_ms``, ``overhead`` (= step / bare), ``augment_ms``, ``teacher_net_ms``,
    ``student_net_ms``, ``losses_centering_ms``, ``optim_ms``, ``ema_ms``, ``teacher_bare_ms``,
    ``student_bare_ms``, ``images_per_s`` (B / step), ``step_images_per_s`` (B / (step + augment)),
    and the settings (``preset``, ``batch_size``, ``patch_size``, ``device``, ``bf16``, ``threads``).
    """
    from openpluto.ssl import BatchAugment
    from openpluto.ssl.image_ops import to_device
    from openpluto.train.optim import apply_schedule, build_optimizer, param_groups
    from openpluto.train.trainer import build_meta

    dev = resolve_device(device)
    cfg = _config(preset, batch_size, overrides)
    use_bf16 = dev.type == "cuda"
    meta, backbone = build_meta(cfg, dev)
    meta.train()
    no_wd = [f"backbone.{n}" for n in backbone.no_weight_decay()]
    groups = param_groups(meta.student, len(backbone.blocks), cfg.optim.layerwise_decay,
                          cfg.optim.patch_embed_lr_mult, no_wd)
    opt = build_optimizer(groups, tuple(cfg.optim.betas), fused=True)  # as the trainer (without FSDP)
    apply_schedule(opt, 1e-4, 0.04, 1e-4)
    params = [p for g in groups for p in g["params"]]
    augment = BatchAugment(cfg.ssl.crops.augment, backbone.cfg.mean, backbone.cfg.std)
    ps = int(patch_size)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)

    def full_step(batch):
        with autocast():
            losses = meta(batch, ps, 0.05)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        meta.update_teacher(0.996)

    def meta_fwd_bwd(batch):
        with autocast():
            losses = meta(batch, ps, 0.05)
        losses["total"].backward()
        opt.zero_grad(set_to_none=True)

    def masks(batch):
        if "masks" not in batch:
            return None, None
        return to_device(batch["masks"], dev), to_device(batch["mask_indices"], dev)

    def teacher_net(batch):  # backbone + heads on the CLS and masked tokens, as in the step
        m, idx = masks(batch)
        with torch.no_grad(), autocast():
            meta.teacher(batch["global_crops"], None, m, ps, mask_inputs=False, mask_indices=idx)

    def student_net(batch):
        m, idx = masks(batch)
        with autocast():
            out = meta.student(batch["global_crops"], batch["local_crops"], m, ps, mask_indices=idx)
        sum(v.float().sum() for v in out.values()).backward()
        opt.zero_grad(set_to_none=True)

    def teacher_bare(batch):
        with torch.no_grad(), autocast():
            meta.teacher.backbone.forward_features(batch["global_crops"], patch_size=ps)

    def student_bare(batch):
        with autocast():
            a = meta.student.backbone.forward_features(batch["global_crops"], patch_size=ps)["cls"]
            b = meta.student.backbone.forward_features(batch["local_crops"], patch_size=ps)["cls"]
        (a.float().sum() + b.float().sum()).backward()
        opt.zero_grad(set_to_none=True)

    def optim_only(batch):
        for p in params:
            p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    parts = {"step": full_step, "meta_fwd_bwd": meta_fwd_bwd, "teacher_net": teacher_net,
             "student_net": student_net, "teacher_bare": teacher_bare, "student_bare": student_bare,
             "optim": optim_only, "ema": lambda b: meta.update_teacher(0.996)}
    rows, cpu_rows = [], []
    for i, cpu_batch in enumerate(_prepared_batches(cfg, ps, warmup + steps, dev)):
        batch, t_aug, c_aug = _timed(partial(augment, cpu_batch, dev), dev)
        r, c = {"augment": t_aug}, {"augment": c_aug}
        for name, fn in parts.items():
            _, r[name], c[name] = _timed(partial(fn, batch), dev)
        if i >= warmup:
            rows.append(r)
            cpu_rows.append(c)
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    med["losses_centering"] = max(med["meta_fwd_bwd"] - med["teacher_net"] - med["student_net"], 0.0)
    bare = med["teacher_bare"] + med["student_bare"]
    B = cfg.data.batch_size
    res: dict[str, Any] = {f"{k}_ms": round(1000 * v, 3) for k, v in med.items() if k != "meta_fwd_bwd"}
    if dev.type == "cpu":  # CPU time is steadier than wall time on a shared machine (1 thread: exact)
        cpu = {k: float(np.median([r[k] for r in cpu_rows])) for k in cpu_rows[0]}
        res["cpu_ms"] = {k: round(1000 * v, 3) for k, v in cpu.items()}
        res["overhead_cpu_time"] = round(cpu["step"] / (cpu["teacher_bare"] + cpu["student_bare"]), 4)
    res.update(
        preset=preset, batch_size=B, patch_size=ps, device=str(dev), bf16=use_bf16,
        threads=torch.get_num_threads(), steps=len(rows),
        bare_ms=round(1000 * bare, 3),
        overhead=round(med["step"] / bare, 4),
        images_per_s=round(B / med["step"], 2),
        step_images_per_s=round(B / (med["step"] + med["augment"]), 2),
    )
    return res


def measure_loader(preset: str, batch_size: int, workers: int, device: str = "auto", batches: int = 20,
                   patch_size: int = 32, step: dict[str, Any] | None = None, steps: int = 5,
                   overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Images/s the training input pipeline delivers with ``workers`` processes, against the step's appetite.

    The loader runs alone (its start-up and first batch excluded) over ``batches`` batches. The step's
    consumption comes from ``step`` (a :func:`measure_step` result) or is measured here at
    ``patch_size``. Keys: ``images_per_s``, ``step_images_per_s``, ``ratio`` (= loader / step; goal
    >= 1.5), ``workers``, ``batch_size``, ``patch_size``, ``device``, ``tile_px``, and
    ``worker_cpu_ms_per_image`` (one worker's CPU time per image, measured on one thread) with
    ``workers_capacity_images_per_s`` (what ``workers`` processes deliver with a core each).
    """
    from openpluto.ssl import MultiCropTransform
    from openpluto.train.data import build_loader, find_samples

    dev = resolve_device(device)
    cfg = _config(preset, batch_size, overrides)
    if step is None:
        step = measure_step(preset, batch_size, patch_size, str(dev), steps, overrides=overrides)
    B = cfg.data.batch_size
    samples = find_samples(synthetic_tiles(_tile_size(cfg)))
    loader = build_loader(samples, MultiCropTransform(cfg.ssl.crops), _worker_collate(cfg, patch_size, B), B,
                          cfg.seed, 0, 1, 0, int(workers), cfg.data.prefetch_factor, dev.type == "cuda")
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    ips = batches * B / (time.perf_counter() - t)
    del it, loader
    # One worker's CPU cost per image, measured in this process on one thread: what `workers` processes
    # deliver at most with a core each (steady on a shared machine, unlike the wall time above).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n_cpu = max(1, min(batches, 3))
    c = time.process_time()
    _prepared_batches(cfg, patch_size, n_cpu, torch.device("cpu"))
    worker_ms = 1000 * (time.process_time() - c) / (n_cpu * B)
    torch.set_num_threads(threads)
    return {
        "preset": preset,
        "images_per_s": round(ips, 2),
        "step_images_per_s": step["step_images_per_s"],
        "ratio": round(ips / step["step_images_per_s"], 3),
        "workers": int(workers),
        "batch_size": B,
        "patch_size": int(patch_size),
        "device": str(dev),
        "tile_px": _tile_size(cfg),
        "worker_cpu_ms_per_image": round(worker_ms, 3),
        "workers_capacity_images_per_s": round(int(workers) * 1000 / worker_ms, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cpu-tiny")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's data.batch_size")
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: the preset's)")
    ap.add_argument("--loader-batches", type=int, default=20, help="0: skip the loader measurement")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    B = args.batch_size or load_preset_batch(args.config)
    cfg = _config(args.config, B, args.overrides)
    workers = cfg.data.num_workers if args.workers is None else args.workers
    step = measure_step(args.config, B, args.patch_size, args.device, args.steps, args.warmup,
                        args.overrides)
    print(f"{args.config} B={B} patch={args.patch_size} on {step['device']} "
          f"({'bf16' if step['bf16'] else 'fp32'}, {step['threads']} threads), "
          f"median of {step['steps']} steps:")
    for k in ("augment", "teacher_net", "student_net", "losses_centering", "optim", "ema", "step",
              "teacher_bare", "student_bare"):
        print(f"  {k:18s} {step[k + '_ms']:9.1f} ms")
    print(f"  step / bare model passes = {step['overhead']:.3f}x "
          "(goal <= 1.15 on GPU, <= 1.2 cpu-tiny on CPU)")
    result = {"step": step}
    if args.loader_batches > 0:
        loader = measure_loader(args.config, B, workers, args.device, args.loader_batches, args.patch_size,
                                step=step, overrides=args.overrides)
        result["loader"] = loader
        print(f"  loader {loader['images_per_s']:.0f} img/s ({workers} workers) vs the step consumes "
              f"{loader['step_images_per_s']:.0f} img/s (augmentation included): {loader['ratio']:.2f}x "
              "(goal >= 1.5)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def load_preset_batch(preset: str) -> int:
    """The preset's own ``data.batch_size``."""
    from openpluto.train.config import load_train_config

    return load_train_config(preset).data.batch_size


if __name__ == "__main__":
    sys.exit(main())

"""The pretraining loop: one process, or one per GPU/CPU rank under ``torchrun``.

Per optimizer step ``s`` (all values are functions of ``s``, so a resumed run repeats an uninterrupted one):

1. schedules -> lr (per group: layer-wise decay, patch-embed multiplier, last-layer freeze), weight decay,
   teacher temperature, EMA momentum; patch size drawn from a generator seeded by ``(seed, s)``;
2. ``accum`` micro-batches: multi-crop views -> ``meta(batch, patch_size, teacher_temp, generator)`` under
   bf16 autocast on CUDA (fp32 on CPU; the SSL losses compute in fp32) -> ``backward(total / accum)``;
   DDP/FSDP gradient sync only on the last micro-batch;
3. gradient clipping (3.0), a rank-wide non-finite check (skip the step, count it; ``max_nonfinite_in_row``
   skips in a row stop the run), AdamW step, EMA teacher update;
4. rank 0 logs scalars (CSV + TensorBoard) and writes ``checkpoint.pt`` every ``log.checkpoint_every``
   steps, at the end, and when SIGTERM arrives (the stop request is agreed on by all ranks first).

Gradient accumulation: every micro-batch is a complete multi-crop batch (all crops of the same images),
so DINO/iBOT pairs never straddle micro-batches; the teacher outputs of each micro-batch are centred on
their own (Sinkhorn-Knopp over that micro-batch x ranks) and KoLeo sees one micro-batch per rank; the
softmax-centre EMA (if used) updates once per step, from the last micro-batch, so its momentum keeps its
per-step meaning. The optimizer and the EMA teacher update once per step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openpluto.config import save_yaml, to_dict
from openpluto.errors import OpenPlutoError
from openpluto.io import clean_stale_temps, write_json_atomic
from openpluto.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    full_state,
    load_checkpoint,
    load_full_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from openpluto.train.config import TrainConfig
from openpluto.train.data import _mix, build_loader, find_samples
from openpluto.train.distributed import (
    DistInfo,
    any_across_ranks,
    barrier,
    broadcast_module,
    cleanup_distributed,
    init_distributed,
    shard_fsdp2,
    wrap_ddp,
)
from openpluto.train.metrics import MetricsLog, collapse_warning, plot_loss_curve
from openpluto.train.optim import apply_schedule, build_optimizer, param_groups
from openpluto.train.patch_sizes import patch_size_for_step
from openpluto.train.schedules import Schedules, scaled_lr


class NonFiniteLossError(OpenPlutoError):
    """Too many non-finite steps in a row."""


def build_meta(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(SSL meta-architecture on ``device``, its student backbone) for ``cfg``; seeded by ``cfg.seed``."""
    from openpluto.model import build_model
    from openpluto.ssl import SSLMetaArch

    torch.manual_seed(cfg.seed)
    backbone = build_model(cfg.model, **cfg.model_overrides)
    sizes = tuple(cfg.patch_sizes or backbone.patch_sizes)
    bad = [p for p in sizes if p not in backbone.patch_sizes]
    if bad:
        raise OpenPlutoError(
            f"patch_sizes {list(sizes)} include {bad[0]}, which model '{cfg.model}' was not built for "
            f"({list(backbone.patch_sizes)}); set patch_sizes or model_overrides.patch_sizes"
        )
    meta = SSLMetaArch(backbone, cfg.ssl, patch_sizes=sizes).to(device)
    return meta, backbone


def make_schedules(cfg: TrainConfig, global_batch: int) -> Schedules:
    o, s = cfg.optim, cfg.schedule
    return Schedules(
        total_steps=cfg.max_steps,
        peak_lr=scaled_lr(o.base_lr, global_batch, o.ref_batch_size, o.lr_scaling),
        min_lr=o.min_lr,
        warmup_steps=s.warmup_steps,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        teacher_temp_start=s.teacher_temp_start,
        teacher_temp=s.teacher_temp,
        teacher_temp_warmup_steps=s.teacher_temp_warmup_steps,
        momentum_start=s.momentum_start,
        momentum_end=s.momentum_end,
        freeze_last_layer_steps=s.freeze_last_layer_steps,
    )


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _grad_sync(student: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context that enables/disables DDP or FSDP2 gradient sync for one micro-batch."""
    if hasattr(student, "no_sync") and not enabled:
        return student.no_sync()
    if hasattr(student, "set_requires_gradient_sync"):
        student.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def ranks_agree(student: nn.Module, patches: list[int], info: DistInfo) -> dict[str, bool] | None:
    """Check that every rank drew the same patch sizes and holds the same (full) student weights."""
    if not info.initialized:
        return None
    import torch.distributed as dist

    sums = []
    with torch.no_grad():
        for p in student.parameters():
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            sums.append(t.detach().double().sum().item())
            sums.append(t.detach().double().norm().item())
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, {"patches": list(patches), "weights": sums})
    return {
        "patch_sizes": all(g["patches"] == gathered[0]["patches"] for g in gathered),
        "weights": all(g["weights"] == gathered[0]["weights"] for g in gathered),
    }


def pretrain(cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) pretraining into ``out_dir``; returns a summary dict (rank 0's view)."""
    from openpluto.ssl import MultiCropTransform, collate_multicrop

    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    if ckpt_path.is_file() and not resume:
        raise OpenPlutoError(
            f"{out_dir} already holds a checkpoint; add --resume to continue it or pick a new --out"
        )
    if not cfg.data.path:
        raise OpenPlutoError("no training data; pass --data DIR (tile shards or an image folder)")
    info = init_distributed(cfg.dist.backend)
    try:
        return _run(cfg, out_dir, resume and ckpt_path.is_file(), info, MultiCropTransform, collate_multicrop)
    finally:
        cleanup_distributed(info)


def _run(cfg: TrainConfig, out_dir: Path, resume: bool, info: DistInfo, MultiCropTransform, collate) -> dict:
    device = info.device
    samples = find_samples(cfg.data.path, cfg.data.image_keys)
    meta, backbone = build_meta(cfg, device)
    sizes = tuple(cfg.patch_sizes or backbone.patch_sizes)
    depth = len(backbone.blocks)
    if cfg.dist.activation_checkpointing:
        backbone.set_grad_checkpointing(True)
    if cfg.dist.compile_blocks:
        for blk in backbone.blocks:
            blk.compile()

    if info.initialized:
        if cfg.dist.strategy == "fsdp":
            shard_fsdp2(meta.student, info)
            shard_fsdp2(meta.teacher, info)
        else:
            broadcast_module(meta.teacher, info)
            meta.student = wrap_ddp(
                meta.student,
                info,
                cfg.dist.bucket_cap_mb,
                cfg.dist.gradient_as_bucket_view,
                cfg.dist.find_unused_parameters,
            )
    student = meta.student
    groups = param_groups(
        student,
        depth,
        cfg.optim.layerwise_decay,
        cfg.optim.patch_embed_lr_mult,
        no_wd_names=[f"backbone.{n}" for n in backbone.no_weight_decay()],
    )
    optimizer = build_optimizer(groups, tuple(cfg.optim.betas), cfg.optim.eps)
    trainable = [p for g in groups for p in g["params"]]

    accum = cfg.accum_steps(info.world_size)
    global_batch = cfg.data.batch_size * info.world_size * accum
    sched = make_schedules(cfg, global_batch)

    start_step, data_position, skipped_total = 0, 0, 0
    if resume:
        ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME)
        try:
            load_full_state(meta, optimizer, ckpt["model"], ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"{out_dir / CHECKPOINT_NAME} does not fit this config (model/heads changed?): "
                f"{str(e).splitlines()[0][:200]}; resume with the run's own config.yaml"
            ) from None
        set_rng_state(ckpt["rng"])
        start_step, data_position = int(ckpt["step"]), int(ckpt["data_position"])
        per_micro = cfg.data.batch_size * info.world_size
        if int(ckpt.get("images_per_micro_batch", per_micro)) != per_micro:  # world or batch size changed
            data_position = int(ckpt["samples_seen"]) // per_micro
        skipped_total = int(ckpt.get("nonfinite_skipped", 0))
        del ckpt

    use_bf16 = device.type == "cuda" and cfg.dist.precision in ("auto", "bf16")
    transform = MultiCropTransform(cfg.ssl.crops, backbone.cfg.mean, backbone.cfg.std)
    loader = build_loader(
        samples,
        transform,
        collate,
        cfg.data.batch_size,
        cfg.seed,
        info.rank,
        info.world_size,
        data_position,
        cfg.data.num_workers,
        cfg.data.prefetch_factor,
        device.type == "cuda",
    )

    log = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out_dir)
        save_yaml(cfg, out_dir / "config.yaml")
        log = MetricsLog(out_dir, start_step, cfg.log.tensorboard)
        print(
            f"pretrain: {cfg.model} on {len(samples)} samples, {info.world_size} rank(s) x "
            f"{cfg.data.batch_size} x {accum} accum = {global_batch} images/step, patch sizes {list(sizes)}, "
            f"peak lr {sched.peak_lr:.3g}, steps {start_step}->{cfg.max_steps}, device {device.type}"
            f"{', bf16' if use_bf16 else ', fp32'}",
            file=sys.stderr,
        )

    def save(step: int, pos: int) -> bool:
        model_sd, optim_sd = full_state(meta, optimizer)
        ok = True
        if info.is_main:
            ok = save_checkpoint(
                out_dir / CHECKPOINT_NAME,
                {
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "step": step,
                    "data_position": pos,
                    "nonfinite_skipped": skipped_total,
                    "samples_seen": pos * cfg.data.batch_size * info.world_size,
                    "images_per_micro_batch": cfg.data.batch_size * info.world_size,
                    "rng": rng_state(),
                    "config": to_dict(cfg),
                    "world_size": info.world_size,
                },
            )
            if not ok:
                print(
                    f"warning: weights are not finite at step {step}; checkpoint NOT written", file=sys.stderr
                )
        barrier(info)
        return ok

    progress = None
    if info.is_main and cfg.log.progress:
        from tqdm import tqdm

        progress = tqdm(
            total=cfg.max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True
        )

    meta.student.train()
    meta.teacher.eval()
    data_iter = iter(loader)
    in_row, step, stopped, warned, last_vals, patches_used = 0, start_step, False, False, {}, []
    t_start = time.perf_counter()
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            v = sched(step)
            apply_schedule(optimizer, v.lr, v.weight_decay, v.last_layer_lr)
            patch = patch_size_for_step(step, sizes, cfg.patch_size_probs, cfg.seed)
            sums: dict[str, float] = {}
            finite, t_data = True, 0.0
            for micro in range(accum):
                td = time.perf_counter()
                batch = next(data_iter)
                t_data += time.perf_counter() - td
                batch = {
                    k: (t.to(device, non_blocking=True) if torch.is_tensor(t) else t)
                    for k, t in batch.items()
                }
                torch.manual_seed(
                    _mix(cfg.seed, 2, step, micro, info.rank)
                )  # drop-path etc.: worker-independent
                gen = torch.Generator().manual_seed(_mix(cfg.seed, 3, step, micro, info.rank))
                with _grad_sync(student, micro == accum - 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        losses = meta(batch, patch, v.teacher_temp, gen, update_centers=micro == accum - 1)
                    total = losses["total"]
                    (total / accum).backward()
                finite = finite and bool(torch.isfinite(total.detach()))
                for k, t in losses.items():
                    val = float(t.detach()) if torch.is_tensor(t) else float(t)
                    sums[k] = sums.get(k, 0.0) + val / accum
            data_position += accum
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.clip_grad)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            bad, stop_now = any_across_ranks(
                [not (finite and math.isfinite(grad_norm)), stop.requested], info, device
            )
            if bad:
                optimizer.zero_grad(set_to_none=True)
                skipped_total += 1
                in_row += 1
                if in_row >= cfg.max_nonfinite_in_row:
                    raise NonFiniteLossError(
                        f"non-finite loss/gradients for {in_row} steps in a row (last at step {step}); "
                        f"the last finite checkpoint is {out_dir / CHECKPOINT_NAME}. Lower optim.base_lr, "
                        "raise schedule.warmup_steps or check the data, then --resume"
                    )
            else:
                in_row = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                meta.update_teacher(v.momentum)
            step += 1
            dt = time.perf_counter() - t0
            patches_used.append(patch)
            last_vals = {
                **sums,
                "lr": v.lr,
                "wd": v.weight_decay,
                "momentum": v.momentum,
                "teacher_temp": v.teacher_temp,
                "patch_size": patch,
                "grad_norm": grad_norm,
                "images_per_s": global_batch / dt,
                "step_time_s": dt,
                "data_time_s": t_data,
                "skipped": skipped_total,
            }
            if log is not None and (
                step % cfg.log.log_every == 0 or step == cfg.max_steps or step == start_step + 1
            ):
                log.log(step, last_vals)
                if step % cfg.log.plot_every == 0:
                    plot_loss_curve(out_dir)
                # After the teacher-temperature warm-up, warn once if the monitors show a run that
                # cannot learn (uniform targets) or has collapsed (identical features).
                if not warned and step >= max(sched.teacher_temp_warmup_steps, sched.warmup_steps):
                    msg = collapse_warning(sums, cfg.ssl.heads.out_dim, step)
                    if msg:
                        warned = True
                        print(msg, file=sys.stderr)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(
                    loss=f"{sums.get('total', float('nan')):.3f}", p=patch, skip=skipped_total
                )
            if stop_now or step % cfg.log.checkpoint_every == 0 or step == cfg.max_steps:
                save(step, data_position)
            if stop_now:
                stopped = True
                break
    if progress is not None:
        progress.close()
    del data_iter
    agree = ranks_agree(meta.student, patches_used, info)
    summary = {
        "steps": step,
        "start_step": start_step,
        "stopped_by_signal": stopped,
        "ranks_agree": agree,
        "nonfinite_skipped": skipped_total,
        "global_batch": global_batch,
        "world_size": info.world_size,
        "wall_s": round(time.perf_counter() - t_start, 2),
        "last": last_vals,
    }
    if log is not None:
        log.close()
        plot_loss_curve(out_dir)
        write_json_atomic(out_dir / "summary.json", summary)
        print(
            f"pretrain: {'stopped (SIGTERM) at' if stopped else 'finished'} step {step}/{cfg.max_steps}, "
            f"loss {last_vals.get('total', float('nan')):.4f}, {skipped_total} skipped; run dir {out_dir} "
            f"(checkpoint.pt, metrics.csv, loss_curve.png, tb/)",
            file=sys.stderr,
        )
    return summary

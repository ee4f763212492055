"""The pretraining loop: one process, or one per GPU/CPU rank under ``torchrun``.

Per optimizer step ``s`` (all values are functions of ``s``, so a resumed run repeats an uninterrupted one):

1. schedules -> lr (per group: layer-wise decay, patch-embed multiplier, last-layer freeze), weight decay,
   teacher temperature, EMA momentum; patch size drawn from a generator seeded by ``(seed, s)``;
2. ``accum`` micro-batches: uint8 crops, augmentation parameters and iBOT masks from the loader workers
   -> :class:`~openpluto.ssl.augment.BatchAugment` on the device -> ``meta(batch, patch_size,
   teacher_temp)`` under bf16 autocast on CUDA (fp32 on CPU; the SSL losses compute in fp32) ->
   ``backward(total / accum)``; DDP/FSDP gradient sync only on the last micro-batch;
3. gradient clipping (3.0), a rank-wide non-finite check (skip the step, count it; ``max_nonfinite_in_row``
   skips in a row stop the run), AdamW step, EMA teacher update;
4. rank 0 logs scalars (CSV + TensorBoard) every ``log.log_every`` steps and writes ``checkpoint.pt``
   every ``log.checkpoint_every`` steps, at the end, and before stopping early; with ``log.keep_every``
   it also writes one every that many steps and keeps it as ``checkpoints/step_NNNNNNN.pt``.

The run stops at ``max_steps``, or early (after a checkpoint) at the first step boundary after
``max_minutes`` of wall time or after SIGTERM/SIGINT; every rank agrees on the stop first. The time
limit never changes what a step computes: the schedules are defined by ``max_steps``.
The loss values stay on the device until a logged step; each step waits for the device once, for the
non-finite check.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from openpluto.config import save_yaml, to_dict
from openpluto.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from openpluto.errors import OpenPlutoError
from openpluto.io import clean_stale_temps, write_json_atomic
from openpluto.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    full_state,
    keep_checkpoint,
    kept_checkpoint_path,
    load_checkpoint,
    load_full_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from openpluto.train.config import TrainConfig
from openpluto.train.data import DataError, StepMasks, _mix, build_loader, find_samples
from openpluto.train.distributed import any_across_ranks, broadcast_module, shard_fsdp2, wrap_ddp
from openpluto.train.metrics import MetricsLog, collapse_warning, plot_loss_curve
from openpluto.train.optim import apply_schedule, build_optimizer, param_groups
from openpluto.train.patch_sizes import patch_size_for_step
from openpluto.train.schedules import Schedules, ScheduleValues, scaled_lr

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(OpenPlutoError):
    """Too many non-finite steps in a row."""


def build_meta(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(SSL meta-architecture on ``device``, its student backbone) for ``cfg``; seeded by ``cfg.seed``."""
    from openpluto.model import build_model, maybe_compile
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
    return maybe_compile(meta, cfg.compile), backbone


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
    """Records SIGTERM/SIGINT; the loop checkpoints and exits at the end of the current step.

    The first signal only sets the flag and puts the previous handlers back, so a second one acts as
    usual (e.g. a second Ctrl-C interrupts at once).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


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


@dataclass
class _Run:
    """What set-up builds: the model, its optimizer and the fixed facts of the run."""

    meta: nn.Module
    backbone: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[torch.Tensor]
    sizes: tuple[int, ...]
    accum: int
    global_batch: int
    sched: Schedules
    device: torch.device
    use_bf16: bool


@dataclass
class _Progress:
    """What a checkpoint restores and every step advances."""

    step: int = 0
    data_position: int = 0  # micro-batches consumed by this rank
    skipped_total: int = 0
    in_row: int = 0  # non-finite steps in a row
    patches_used: list[int] = field(default_factory=list)


@dataclass
class _StepResult:
    """One optimizer step's schedule values, patch size, losses (on the device) and host-side checks."""

    values: ScheduleValues
    patch: int
    losses: dict[str, torch.Tensor]
    total: float
    grad_norm: float
    data_s: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.total) and math.isfinite(self.grad_norm)


# ---------------------------------------------------------------------------------------------- entry


def pretrain(cfg: TrainConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) pretraining into ``out_dir``; returns a summary dict (rank 0's view).

    The summary holds ``steps_done`` (optimizer steps the run has made, earlier runs included),
    ``start_step``, ``stopped_by`` (``"max_steps"``, ``"max_minutes"`` or ``"signal"``), ``signal``
    (the signal number when stopped by one), the last logged values and run facts. ``max_minutes``
    counts wall time from this call.
    """
    t_start = time.perf_counter()
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
        summary = _pretrain_in_group(cfg, out_dir, resume and ckpt_path.is_file(), info, t_start)
    except BaseException:
        cleanup_distributed(info, graceful=False)
        raise
    cleanup_distributed(info)  # the model (and its DDP reducer) already out of scope
    return summary


def _pretrain_in_group(cfg: TrainConfig, out_dir: Path, resume: bool, info: DistInfo,
                       t_start: float) -> dict[str, Any]:
    samples = _training_samples(cfg, info)
    run = _set_up(cfg, info)
    progress = _resume(cfg, out_dir / CHECKPOINT_NAME, run, info) if resume else _Progress()
    if resume and info.is_main:
        _keep_missed(cfg, out_dir, progress.step)
    return _train(cfg, out_dir, run, progress, samples, info, t_start)


# ---------------------------------------------------------------------------------------------- set-up


def _training_samples(cfg: TrainConfig, info: DistInfo) -> Dataset:
    """The data's samples; fewer than one global micro-batch cannot train anything and is refused."""
    samples = find_samples(cfg.data.path, cfg.data.image_keys)
    need = cfg.data.batch_size * info.world_size
    if len(samples) < need:
        raise DataError(
            f"{cfg.data.path} holds {len(samples)} image(s), fewer than one batch of {need} "
            f"(data.batch_size {cfg.data.batch_size} x {info.world_size} rank(s)); "
            "add tiles to the folder or lower data.batch_size"
        )
    return samples


def _set_up(cfg: TrainConfig, info: DistInfo) -> _Run:
    """Model (wrapped for DDP / sharded for FSDP2), optimizer and schedules."""
    device = info.device
    meta, backbone = build_meta(cfg, device)
    if cfg.dist.activation_checkpointing:
        backbone.set_grad_checkpointing(True)
    if cfg.dist.compile_blocks:
        for blk in backbone.blocks:
            blk.compile()
    fsdp = info.initialized and cfg.dist.strategy == "fsdp"
    if fsdp:
        shard_fsdp2(meta.student, info)
        shard_fsdp2(meta.teacher, info)
    elif info.initialized:
        broadcast_module(meta.teacher, info)
        d = cfg.dist
        meta.student = wrap_ddp(meta.student, info, d.bucket_cap_mb, d.gradient_as_bucket_view,
                                d.find_unused_parameters)
    groups = param_groups(
        meta.student,
        len(backbone.blocks),
        cfg.optim.layerwise_decay,
        cfg.optim.patch_embed_lr_mult,
        no_wd_names=[f"backbone.{n}" for n in backbone.no_weight_decay()],
    )
    # Fused AdamW: one pass over the parameters (5x faster than the foreach default on CPU too);
    # FSDP2's sharded parameters keep the default.
    fused = None if fsdp else True
    optimizer = build_optimizer(groups, tuple(cfg.optim.betas), cfg.optim.eps, fused=fused)
    accum = cfg.accum_steps(info.world_size)
    global_batch = cfg.data.batch_size * info.world_size * accum
    return _Run(
        meta=meta,
        backbone=backbone,
        optimizer=optimizer,
        trainable=[p for g in groups for p in g["params"]],
        sizes=tuple(cfg.patch_sizes or backbone.patch_sizes),
        accum=accum,
        global_batch=global_batch,
        sched=make_schedules(cfg, global_batch),
        device=device,
        use_bf16=device.type == "cuda" and cfg.dist.precision in ("auto", "bf16"),
    )


def _resume(cfg: TrainConfig, ckpt_path: Path, run: _Run, info: DistInfo) -> _Progress:
    """Load weights, optimizer, RNG states and the data position from ``ckpt_path``."""
    ckpt = load_checkpoint(ckpt_path)
    try:
        load_full_state(run.meta, run.optimizer, ckpt["model"], ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt_path} does not fit this config (model/heads changed?): "
            f"{str(e).splitlines()[0][:200]}; resume with the run's own config.yaml"
        ) from None
    set_rng_state(ckpt["rng"])
    data_position = int(ckpt["data_position"])
    per_micro = cfg.data.batch_size * info.world_size
    if int(ckpt.get("images_per_micro_batch", per_micro)) != per_micro:  # world or batch size changed
        data_position = int(ckpt["samples_seen"]) // per_micro
    return _Progress(step=int(ckpt["step"]), data_position=data_position,
                     skipped_total=int(ckpt.get("nonfinite_skipped", 0)))


def _data(cfg: TrainConfig, run: _Run, progress: _Progress, samples: Dataset, info: DistInfo):
    """(endless loader of this rank's micro-batches from the checkpointed position, batch augmenter).

    Workers decode and crop (uint8), draw the augmentation parameters and the iBOT masks; the
    augmenter applies the steps on the training device.
    """
    from openpluto.ssl import BatchAugment, MultiCropTransform, collate_multicrop

    collate = StepMasks(collate_multicrop, cfg.ssl, run.sizes, cfg.patch_size_probs, cfg.seed, info.rank,
                        info.world_size, cfg.data.batch_size, run.accum, progress.step,
                        progress.data_position)
    loader = build_loader(
        samples,
        MultiCropTransform(cfg.ssl.crops),
        collate,
        cfg.data.batch_size,
        cfg.seed,
        info.rank,
        info.world_size,
        progress.data_position,
        cfg.data.num_workers,
        cfg.data.prefetch_factor,
        run.device.type == "cuda",
    )
    return loader, BatchAugment(cfg.ssl.crops.augment, run.backbone.cfg.mean, run.backbone.cfg.std)


def _open_logs(cfg: TrainConfig, out_dir: Path, run: _Run, progress: _Progress, n_samples: int,
               info: DistInfo) -> MetricsLog | None:
    """Rank 0: create the run dir, save the config, open the metrics log and say what will run."""
    if not info.is_main:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out_dir)
    save_yaml(cfg, out_dir / "config.yaml")
    limit = f", stops after {cfg.max_minutes:g} min" if cfg.max_minutes is not None else ""
    print(
        f"pretrain: {cfg.model} on {n_samples} samples, {info.world_size} rank(s) x "
        f"{cfg.data.batch_size} x {run.accum} accum = {run.global_batch} images/step, patch sizes "
        f"{list(run.sizes)}, peak lr {run.sched.peak_lr:.3g}, steps {progress.step}->{cfg.max_steps}{limit}, "
        f"device {run.device.type}{', bf16' if run.use_bf16 else ', fp32'}",
        file=sys.stderr,
    )
    return MetricsLog(out_dir, progress.step, cfg.log.tensorboard)


# ---------------------------------------------------------------------------------------------- loop


def _train(cfg: TrainConfig, out_dir: Path, run: _Run, progress: _Progress, samples: Dataset,
           info: DistInfo, t_start: float) -> dict[str, Any]:
    """Steps until ``max_steps``, the time limit or a signal; checkpoints; returns the summary."""
    loader, augment = _data(cfg, run, progress, samples, info)
    log = _open_logs(cfg, out_dir, run, progress, len(samples), info)
    bar = _progress_bar(cfg, progress, info)
    start_step, stopped_by, warned, last = progress.step, "max_steps", False, {}
    run.meta.student.train()
    run.meta.teacher.eval()
    data_iter = iter(loader)
    with _StopFlag() as signals:
        while progress.step < cfg.max_steps:
            t0 = time.perf_counter()
            res = _forward_backward(cfg, run, progress.step, data_iter, augment, info)
            time_up = cfg.max_minutes is not None and time.perf_counter() - t_start >= 60 * cfg.max_minutes
            bad, by_signal, by_time = any_across_ranks(
                [not res.finite, signals.signum is not None, time_up], info, run.device)
            _update(cfg, run, progress, res, bad, out_dir)
            dt = time.perf_counter() - t0
            stop = "signal" if by_signal else ("max_minutes" if by_time else None)
            if progress.step >= cfg.max_steps:
                stop = None  # the run is complete whatever arrived during its last step
            if stop or _log_due(cfg, progress.step, start_step):
                last = _row(res, progress, run, dt)
                warned = _log(cfg, log, out_dir, progress.step, last, run, warned)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.total:.3f}", p=res.patch, skip=progress.skipped_total)
            if stop or _checkpoint_due(cfg, progress.step):
                _save(cfg, out_dir, run, progress, info)
            if stop:
                stopped_by = stop
                break
        signum = signals.signum
    if bar is not None:
        bar.close()
    del data_iter
    return _finish(cfg, out_dir, run, progress, info, log, start_step, stopped_by, signum, last, t_start)


def _forward_backward(cfg: TrainConfig, run: _Run, step: int, data_iter, augment, info: DistInfo
                      ) -> _StepResult:
    """Schedules, the ``accum`` micro-batches (forward + backward) and gradient clipping of one step."""
    v = run.sched(step)
    apply_schedule(run.optimizer, v.lr, v.weight_decay, v.last_layer_lr)
    patch = patch_size_for_step(step, run.sizes, cfg.patch_size_probs, cfg.seed)
    losses: dict[str, torch.Tensor] = {}
    data_s = 0.0
    for micro in range(run.accum):
        td = time.perf_counter()
        batch = next(data_iter)
        data_s += time.perf_counter() - td
        if batch.get("patch_size", patch) != patch:
            raise OpenPlutoError(f"the loader prepared patch size {batch['patch_size']} for step {step}, "
                                 f"not {patch}: data and step counters disagree")
        batch = augment(batch, run.device)
        torch.manual_seed(_mix(cfg.seed, 2, step, micro, info.rank))  # drop-path etc.: worker-independent
        last = micro == run.accum - 1
        with _grad_sync(run.meta.student, last):
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
                out = run.meta(batch, patch, v.teacher_temp, update_centers=last)
            (out["total"] / run.accum).backward()
        for k, t in out.items():
            losses[k] = losses[k] + t.detach() / run.accum if k in losses else t.detach() / run.accum
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.optim.clip_grad)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    # The one wait for the device per step: the skip decision needs these two numbers on the host.
    check = torch.stack([losses["total"].float(), grad_norm.float().to(losses["total"].device)])
    total, norm = check.tolist()
    return _StepResult(v, patch, losses, total, norm, data_s)


def _update(cfg: TrainConfig, run: _Run, progress: _Progress, res: _StepResult, bad: bool,
            out_dir: Path) -> None:
    """AdamW step and EMA teacher update, or skip a non-finite step (too many in a row stop the run)."""
    if bad:
        run.optimizer.zero_grad(set_to_none=True)
        progress.skipped_total += 1
        progress.in_row += 1
        if progress.in_row >= cfg.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"non-finite loss/gradients for {progress.in_row} steps in a row (last at step "
                f"{progress.step}); the last finite checkpoint is {out_dir / CHECKPOINT_NAME}. Lower "
                "optim.base_lr, raise schedule.warmup_steps or check the data, then --resume"
            )
    else:
        progress.in_row = 0
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.meta.update_teacher(res.values.momentum)
    progress.step += 1
    progress.data_position += run.accum
    progress.patches_used.append(res.patch)


def _log_due(cfg: TrainConfig, step: int, start_step: int) -> bool:
    return step % cfg.log.log_every == 0 or step == cfg.max_steps or step == start_step + 1


def _row(res: _StepResult, progress: _Progress, run: _Run, dt: float) -> dict[str, float]:
    """The scalars of a logged step (the loss values are fetched from the device here, at once)."""
    keys = list(res.losses)
    values = torch.stack([res.losses[k].float() for k in keys]).tolist()
    v = res.values
    return {
        **dict(zip(keys, values)),
        "lr": v.lr,
        "wd": v.weight_decay,
        "momentum": v.momentum,
        "teacher_temp": v.teacher_temp,
        "patch_size": res.patch,
        "grad_norm": res.grad_norm,
        "images_per_s": run.global_batch / dt,
        "step_time_s": dt,
        "data_time_s": res.data_s,
        "skipped": progress.skipped_total,
    }


def _log(cfg: TrainConfig, log: MetricsLog | None, out_dir: Path, step: int, row: dict[str, float],
         run: _Run, warned: bool) -> bool:
    """Rank 0 writes the row (and the loss curve now and then); warns once about a run that cannot learn
    (uniform targets) or has collapsed, after the warm-ups. Returns whether it has warned."""
    if log is None:
        return warned
    log.log(step, row)
    if step % cfg.log.plot_every == 0:
        plot_loss_curve(out_dir)
    if not warned and step >= max(run.sched.teacher_temp_warmup_steps, run.sched.warmup_steps):
        msg = collapse_warning(row, cfg.ssl.heads.out_dim, step)
        if msg:
            print(msg, file=sys.stderr)
            return True
    return warned


def _progress_bar(cfg: TrainConfig, progress: _Progress, info: DistInfo):
    if not (info.is_main and cfg.log.progress):
        return None
    from openpluto.progress import progress as progress_bar

    return progress_bar(total=cfg.max_steps, initial=progress.step, desc="pretrain", unit="step",
                        dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- checkpoint


def _keep_missed(cfg: TrainConfig, out_dir: Path, step: int) -> None:
    """Keep the checkpoint a run resumes from when its step is a ``keep_every`` step not kept yet (a
    kill between writing it and keeping it)."""
    if step and _keep_step(cfg, step) and not kept_checkpoint_path(out_dir, step).is_file():
        keep_checkpoint(out_dir, step)


def _keep_step(cfg: TrainConfig, step: int) -> bool:
    """Whether the checkpoint of ``step`` is kept (``log.keep_every``; 0 keeps none)."""
    return bool(cfg.log.keep_every) and step % cfg.log.keep_every == 0


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    """Whether ``step`` ends with a checkpoint: every ``checkpoint_every``, every kept step, the last."""
    return step % cfg.log.checkpoint_every == 0 or _keep_step(cfg, step) or step == cfg.max_steps


def _save(cfg: TrainConfig, out_dir: Path, run: _Run, progress: _Progress, info: DistInfo) -> bool:
    """Write ``checkpoint.pt`` (rank 0, atomically; never with non-finite weights) and keep it as
    ``checkpoints/step_N.pt`` on a ``log.keep_every`` step; collective."""
    model_sd, optim_sd = full_state(run.meta, run.optimizer)
    ok = True
    if info.is_main:
        per_micro = cfg.data.batch_size * info.world_size
        ok = save_checkpoint(
            out_dir / CHECKPOINT_NAME,
            {
                "model": model_sd,
                "optimizer": optim_sd,
                "step": progress.step,
                "data_position": progress.data_position,
                "nonfinite_skipped": progress.skipped_total,
                "samples_seen": progress.data_position * per_micro,
                "images_per_micro_batch": per_micro,
                "rng": rng_state(),
                "config": to_dict(cfg),
                "world_size": info.world_size,
            },
        )
        if not ok:
            print(f"warning: weights are not finite at step {progress.step}; checkpoint NOT written",
                  file=sys.stderr)
        elif _keep_step(cfg, progress.step):
            keep_checkpoint(out_dir, progress.step)
    barrier(info)
    return ok


def _finish(cfg: TrainConfig, out_dir: Path, run: _Run, progress: _Progress, info: DistInfo,
            log: MetricsLog | None, start_step: int, stopped_by: str, signum: int | None,
            last: dict[str, float], t_start: float) -> dict[str, Any]:
    """Cross-rank check, summary.json, loss curve and the closing line."""
    summary = {
        "steps_done": progress.step,
        "steps": progress.step,
        "start_step": start_step,
        "stopped_by": stopped_by,
        "signal": signum if stopped_by == "signal" else None,
        "stopped_by_signal": stopped_by == "signal",
        "ranks_agree": ranks_agree(run.meta.student, progress.patches_used, info),
        "nonfinite_skipped": progress.skipped_total,
        "global_batch": run.global_batch,
        "world_size": info.world_size,
        "wall_s": round(time.perf_counter() - t_start, 2),
        "last": last,
    }
    if log is not None:
        log.close()
        plot_loss_curve(out_dir)
        write_json_atomic(out_dir / "summary.json", summary)
        if stopped_by == "max_minutes":
            how = f"stopped by the {cfg.max_minutes:g}-minute limit at"
        elif stopped_by == "signal":
            how = f"stopped by {signal.Signals(signum).name if signum else 'a signal'} at"
        elif progress.step == start_step:
            how = "nothing to do: already at"  # a finished run resumed: no step, so no loss to show
        else:
            how = "finished at"
        loss = f"loss {last['total']:.4f}, " if "total" in last else ""
        kept = ", checkpoints/" if cfg.log.keep_every else ""
        print(
            f"pretrain: {how} step {progress.step}/{cfg.max_steps}, "
            f"{loss}{progress.skipped_total} skipped; "
            f"run dir {out_dir} (checkpoint.pt{kept}, metrics.csv, loss_curve.png, tb/)",
            file=sys.stderr,
        )
    return summary

"""Iteration-indexed schedules (DINOv2 style): lr, weight decay, teacher temperature, EMA momentum.

Everything is counted in optimizer steps ("iterations"), never epochs. Each schedule is a pure
function of the step, so a resumed run sees exactly the values of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``); constant ``end`` after."""
    if total <= 0 or step >= total:
        return end
    t = step / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def linear(step: int, total: int, start: float, end: float) -> float:
    """Straight line from ``start`` (step 0) to ``end`` (step ``total``); constant ``end`` after."""
    if total <= 0 or step >= total:
        return end
    return start + (end - start) * step / total


def warmup_cosine(step: int, total: int, warmup: int, peak: float, final: float, start: float = 0.0) -> float:
    """Linear warm-up ``start -> peak`` over ``warmup`` steps, then cosine ``peak -> final`` at ``total``."""
    if step < warmup:
        return linear(step, warmup, start, peak)
    return cosine(step - warmup, max(total - warmup, 0), peak, final)


def scaled_lr(base_lr: float, global_batch: int, ref_batch: int, rule: str) -> float:
    """Peak lr for ``global_batch`` images/step: ``sqrt`` (DINOv2), ``linear`` or ``none`` scaling."""
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / ref_batch)
    if rule == "linear":
        return base_lr * global_batch / ref_batch
    return base_lr


@dataclass(frozen=True)
class ScheduleValues:
    """Values of all schedules at one step."""

    lr: float
    weight_decay: float
    teacher_temp: float
    momentum: float
    last_layer_lr: float


class Schedules:
    """All training schedules of a run, evaluated at a step.

    Args:
        total_steps: length of the run in optimizer steps.
        peak_lr: lr after warm-up (already batch-size scaled), ``min_lr`` at the end (cosine).
        warmup_steps: linear lr warm-up from 0.
        weight_decay / weight_decay_end: cosine from the first to the second.
        teacher_temp_start / teacher_temp / teacher_temp_warmup_steps: linear warm-up, then constant.
        momentum_start / momentum_end: cosine EMA momentum of the teacher.
        freeze_last_layer_steps: the DINO head's last layer gets lr 0 before this step.
    """

    def __init__(
        self,
        total_steps: int,
        peak_lr: float,
        min_lr: float,
        warmup_steps: int,
        weight_decay: float,
        weight_decay_end: float,
        teacher_temp_start: float,
        teacher_temp: float,
        teacher_temp_warmup_steps: int,
        momentum_start: float,
        momentum_end: float,
        freeze_last_layer_steps: int,
    ) -> None:
        self.total_steps = total_steps
        self.peak_lr, self.min_lr, self.warmup_steps = peak_lr, min_lr, warmup_steps
        self.weight_decay, self.weight_decay_end = weight_decay, weight_decay_end
        self.teacher_temp_start, self.teacher_temp = teacher_temp_start, teacher_temp
        self.teacher_temp_warmup_steps = teacher_temp_warmup_steps
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.freeze_last_layer_steps = freeze_last_layer_steps

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)

    def wd(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def teacher_temperature(self, step: int) -> float:
        return linear(step, self.teacher_temp_warmup_steps, self.teacher_temp_start, self.teacher_temp)

    def momentum(self, step: int) -> float:
        return cosine(step, self.total_steps, self.momentum_start, self.momentum_end)

    def __call__(self, step: int) -> ScheduleValues:
        lr = self.lr(step)
        return ScheduleValues(
            lr=lr,
            weight_decay=self.wd(step),
            teacher_temp=self.teacher_temperature(step),
            momentum=self.momentum(step),
            last_layer_lr=0.0 if step < self.freeze_last_layer_steps else lr,
        )

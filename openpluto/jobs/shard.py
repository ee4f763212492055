"""``--shard I/N``: split the slides of one job over N independent processes or machines.

Every shard discovers the same slides, computes the same ids and the same split, and works on its
own share; outputs per slide are the same as in one run, and each shard writes its own
``manifest``/``summary``/``errors`` part (``errors.part-I-of-N.csv``) that readers take together.

Without ``--shard``, the shard comes from the environment: a Slurm job array
(``SLURM_ARRAY_TASK_ID`` counted from ``SLURM_ARRAY_TASK_MIN``, of ``SLURM_ARRAY_TASK_COUNT``) and/or
torchrun (``RANK`` of ``WORLD_SIZE``); both together make ``task * WORLD_SIZE + RANK`` of
``COUNT * WORLD_SIZE``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from openpluto.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"--shard {self.index}/{self.count}: need 0 <= I < N (e.g. --shard 0/4)")

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, spec: str | None, env: Mapping[str, str] | None = None) -> Shard:
        """``--shard I/N`` (None or ``""``: the Slurm array of the environment, else 0/1), then split
        again over torchrun's ``WORLD_SIZE`` ranks when set (see module docstring)."""
        env = os.environ if env is None else env
        if spec is None or not str(spec).strip():
            index, count = _slurm_array(env)
        else:
            m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
            if not m:
                raise ConfigError(f"--shard {spec!r}: expected I/N, e.g. --shard 0/4 (shard 0 of 4)")
            index, count = int(m.group(1)), int(m.group(2))
            cls(index, count)  # validates I < N before combining with the ranks
        world, rank = _env_int(env, "WORLD_SIZE", 1), _env_int(env, "RANK", 0)
        return cls(index * world + rank, count * world)

    def select(self, items: Sequence[T], weights: Sequence[float] | None = None) -> list[T]:
        """This shard's items, in their order; see :func:`split`."""
        return split(items, self.index, self.count, weights)


def split(items: Sequence[T], index: int, count: int, weights: Sequence[float] | None = None) -> list[T]:
    """Share ``index`` of ``count``: greedy balance by ``weights`` (e.g. file sizes), else round robin.

    Deterministic for the same ``items``/``weights``, so every process computes the same split and
    the shares are disjoint and cover ``items``.
    """
    if count <= 1:
        return list(items)
    if weights is None:
        return list(items[index::count])
    order = sorted(range(len(items)), key=lambda i: (-float(weights[i]), i))
    load = [0.0] * count
    owner = [0] * len(items)
    for i in order:
        r = min(range(count), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += float(weights[i])
    return [items[i] for i in range(len(items)) if owner[i] == index]


def _env_int(env: Mapping[str, str], key: str, default: int) -> int:
    v = env.get(key, "")
    try:
        return int(v) if v.strip() else default
    except ValueError:
        raise ConfigError(f"environment variable {key}={v!r} is not a number") from None


def _slurm_array(env: Mapping[str, str]) -> tuple[int, int]:
    """(task index from 0, task count) of a Slurm job array, (0, 1) outside one."""
    if not (env.get("SLURM_ARRAY_TASK_ID", "").strip() and env.get("SLURM_ARRAY_TASK_COUNT", "").strip()):
        return 0, 1
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT", 1)
    return _env_int(env, "SLURM_ARRAY_TASK_ID", 0) - _env_int(env, "SLURM_ARRAY_TASK_MIN", 0), count

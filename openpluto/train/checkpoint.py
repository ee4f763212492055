"""Full training state to one file, atomically, loadable with ``torch.load(weights_only=True)``.

``RUN/checkpoint.pt`` holds a dict of tensors and plain Python types only:

- ``model``: full (unsharded) state dict of the SSL meta-architecture -- ``student.*``, ``teacher.*``
  (backbone + DINO/iBOT heads) and its buffers (e.g. the softmax-centering center);
- ``optimizer``: AdamW state keyed by parameter name (``torch.distributed.checkpoint.state_dict``);
- ``step`` (next optimizer step), ``data_position`` (micro-batches consumed), ``nonfinite_skipped``;
- ``rng``: torch / CUDA / numpy / python RNG states stored as tensors and ints;
- ``config``: the run's config as a plain dict.

A checkpoint whose weights are not all finite is never written. With ``log.keep_every = N`` the
checkpoint of every N-th step is also kept as ``RUN/checkpoints/step_NNNNNNN.pt`` (a hard link to the
file just written, so keeping costs no copy), for exporting and probing the encoder along the run.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openpluto.errors import OpenPlutoError
from openpluto.io import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
KEPT_DIR = "checkpoints"


class CheckpointError(OpenPlutoError):
    """A checkpoint is missing, unreadable or not from a compatible run."""


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors / plain types (weights_only-safe)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (collective under DDP/FSDP: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict
) -> None:
    """Load unsharded states saved by :func:`full_state` into a (possibly wrapped/sharded) model."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_sd, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def nonfinite_keys(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    bad = []
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(k)
    return bad


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> bool:
    """Write ``state`` atomically (temp file + rename); False (nothing written) if weights are not finite."""
    if nonfinite_keys(state["model"]):
        return False
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return True


def kept_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``RUN/checkpoints/step_NNNNNNN.pt``: where the checkpoint of ``step`` is kept."""
    return Path(run_dir) / KEPT_DIR / f"step_{step:07d}.pt"


def keep_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Keep ``RUN/checkpoint.pt`` as the checkpoint of ``step`` (hard link; a copy where links fail).

    ``checkpoint.pt`` is always replaced by a rename, never rewritten in place, so the link keeps this
    step's bytes. Atomic like every output: a kill leaves no partial ``step_*.pt``.
    """
    src, dst = Path(run_dir) / CHECKPOINT_NAME, kept_checkpoint_path(run_dir, step)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return dst


def kept_steps(run_dir: str | Path) -> list[int]:
    """Steps whose checkpoints ``RUN/checkpoints/`` keeps, ascending."""
    return sorted(int(p.stem[len("step_"):]) for p in (Path(run_dir) / KEPT_DIR).glob("step_*.pt")
                  if p.stem[len("step_"):].isdigit())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; one-line error if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start without --resume or point --out at a run dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/IO failure is a user-facing error
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); delete it or restart"
        ) from None

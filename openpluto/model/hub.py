"""Weights in and out: ``save_pretrained(model, dir)`` / ``load_pretrained(dir)``.

A model directory holds ``config.json`` (``{"format": "openpluto-vit", "model": <ModelConfig>}``) and
``model.safetensors`` (the ``state_dict``). Loading is offline and strict: any missing, unexpected or
mis-shaped key is refused with a one-line error naming the directory and the keys. Nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from openpluto.config import from_dict, to_dict
from openpluto.errors import ConfigError, OpenPlutoError
from openpluto.io import atomic_path, write_json_atomic
from openpluto.model.config import ModelConfig
from openpluto.model.vit import PlutoViT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "openpluto-vit"


def _version() -> str:
    try:
        from openpluto import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def save_pretrained(model: PlutoViT, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` (atomically); return ``out_dir``.

    ``extra`` (JSON-able) is stored under ``"extra"`` in config.json, e.g. the training run it came from.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "openpluto": FORMAT})
    meta = {"format": FORMAT, "openpluto_version": _version(), "model": to_dict(model.cfg)}
    if extra:
        meta["extra"] = extra
    write_json_atomic(out_dir / CONFIG_NAME, meta)
    return out_dir


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding an openpluto ``config.json``."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` stored in ``model_dir/config.json``."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise OpenPlutoError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise OpenPlutoError(f"{model_dir} is not a model directory (expected a folder with {CONFIG_NAME} "
                             f"and {WEIGHTS_NAME})")
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise OpenPlutoError(f"{path} is missing: {model_dir} is not an openpluto model directory "
                             "(write one with save_pretrained or `openpluto export`)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenPlutoError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        raise OpenPlutoError(f"{path} is not an openpluto model config (expected format '{FORMAT}')")
    try:
        return from_dict(ModelConfig, meta["model"])
    except ConfigError as e:
        raise OpenPlutoError(f"{path}: {e}") from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (or, only with ``weights_only=True``, a torch checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise OpenPlutoError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise OpenPlutoError(f"cannot read weights file {path}: {str(e).splitlines()[0][:200]}") from None
    if isinstance(state, dict):
        for key in ("model_ema", "state_dict_ema", "teacher", "model", "state_dict", "module"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OpenPlutoError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(state)`` that refuses missing/unexpected/mis-shaped keys in one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise OpenPlutoError(f"{where} does not match the model config ({'; '.join(parts)})")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise OpenPlutoError(f"{where} has tensors of the wrong shape (file vs model): {_names(bad, 4)}")
    model.load_state_dict(state, strict=True)


def load_pretrained(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> PlutoViT:
    """The PlutoViT saved in ``model_dir`` (``config.json`` + ``model.safetensors``), in eval mode."""
    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.name in (CONFIG_NAME, WEIGHTS_NAME):
        model_dir = model_dir.parent
    cfg = read_config(model_dir)
    weights = model_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise OpenPlutoError(f"{weights} is missing: {model_dir} has a config but no weights")
    state = load_state_dict_file(weights)
    model = PlutoViT(cfg)
    load_state_dict_strict(model, state, str(weights))
    return model.to(device).eval()

"""``load_encoder(spec)``: a frozen feature extractor from an openpluto model dir, a preset, or timm.

``spec`` is one of

- an openpluto model directory (``config.json`` + ``model.safetensors``, from ``save_pretrained`` or
  ``openpluto export``);
- a preset name from ``list_models()`` (random weights: for smoke tests only, a loud warning is logged);
- ``timm:MODEL_NAME:WEIGHTS_PATH[:key=value,...]``: any timm model, weights from a local
  ``.safetensors``/``.pth`` file loaded through timm's own checkpoint filter (``weights_only``), extra
  ``key=value`` pairs passed to ``timm.create_model`` (values parsed as YAML scalars; ``mean`` and
  ``std`` override the normalisation, e.g. ``mean=[0.5,0.5,0.5]``). WEIGHTS_PATH may be a folder
  holding ``model.safetensors`` (such as an ``openpluto export-timm`` output) or empty (random init).

Every Encoder is an ``nn.Module`` in eval mode with ``embed``, ``forward_features`` (same dict keys as
PlutoViT; ``registers`` may be empty), ``embed_dim_for``, ``mean``/``std`` (for 0..1 RGB input),
``name``, ``weights_hash`` (sha256 of the weights file or ``"random-init"``), ``patch_sizes`` and
``default_patch_size``. Its methods run without autograd; an openpluto backbone caches its PI-resized
patch kernel per patch size. After ``maybe_compile`` (``pad_batches``), a batch smaller than the
largest one seen at that image size is zero-padded up to it and the padding rows dropped from the
outputs, so the compiled blocks see one batch shape (images never interact in a ViT).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from openpluto.errors import OpenPlutoError
from openpluto.io import sha256_file
from openpluto.model.factory import build_model, list_models
from openpluto.model.hub import WEIGHTS_NAME, is_model_dir, load_pretrained
from openpluto.model.vit import POOLINGS, PlutoViT

logger = logging.getLogger(__name__)

RANDOM_INIT = "random-init"


class Encoder(nn.Module):
    """Frozen backbone + the metadata downstream stages record (name, weights hash, normalisation)."""

    def __init__(
        self,
        backbone: nn.Module,
        name: str,
        weights_hash: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        patch_sizes: tuple[int, ...],
        default_patch_size: int,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.weights_hash = weights_hash
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.default_patch_size = int(default_patch_size)
        self.embed_dim = int(embed_dim)
        self.pad_batches = False
        self._max_batch: dict[tuple, int] = {}
        self.requires_grad_(False)
        self.eval()

    def _features(self, x: torch.Tensor, patch_size: int | None) -> dict:
        raise NotImplementedError

    def _padded_features(self, x: torch.Tensor, patch_size: int | None) -> dict:
        """``_features``, with ``x`` zero-padded to the largest batch seen when ``pad_batches``."""
        n = x.shape[0]
        if not self.pad_batches:
            return self._features(x, patch_size)
        key = (tuple(x.shape[1:]), patch_size, x.dtype, x.device)
        full = max(self._max_batch.get(key, 0), n)
        self._max_batch[key] = full
        if n == full:
            return self._features(x, patch_size)
        out = self._features(torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))]), patch_size)
        return {k: (v[:n] if torch.is_tensor(v) else v) for k, v in out.items()}

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor, patch_size: int | None = None) -> dict:
        """``x`` ``[B, 3, H, W]`` normalised with ``mean``/``std`` -> dict ``cls`` ``[B, D]``, ``registers``
        ``[B, R, D]``, ``patch`` ``[B, N, D]``, ``grid`` ``(h, w)``."""
        return self._padded_features(x, patch_size)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, patch_size: int | None = None, pooling: str = "cls") -> torch.Tensor:
        """``[B, D]`` (``cls``) or ``[B, 2D]`` (``cls+mean``: cls concatenated with the mean patch token)."""
        if pooling not in POOLINGS:
            raise OpenPlutoError(f"unknown pooling '{pooling}' (choose from {', '.join(POOLINGS)})")
        out = self._padded_features(x, patch_size)
        if pooling == "cls":
            return out["cls"]
        return torch.cat([out["cls"], out["patch"].mean(dim=1)], dim=-1)

    def forward(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        return self.embed(x, patch_size)

    def embed_dim_for(self, pooling: str = "cls") -> int:
        if pooling not in POOLINGS:
            raise OpenPlutoError(f"unknown pooling '{pooling}' (choose from {', '.join(POOLINGS)})")
        return self.embed_dim * (2 if pooling == "cls+mean" else 1)

    def train(self, mode: bool = True) -> Encoder:
        """Encoders stay in eval mode (frozen features); ``train()`` is a no-op."""
        return super().train(False)


class PlutoEncoder(Encoder):
    """Encoder around an openpluto ``PlutoViT``."""

    def __init__(self, model: PlutoViT, name: str, weights_hash: str) -> None:
        super().__init__(model, name, weights_hash, model.cfg.mean, model.cfg.std, model.patch_sizes,
                         model.default_patch_size, model.embed_dim)
        model.set_kernel_cache(True)

    def _features(self, x: torch.Tensor, patch_size: int | None) -> dict:
        return self.backbone.forward_features(x, patch_size)


class TimmEncoder(Encoder):
    """Encoder around any timm ViT-like model (tokens from ``forward_features``, pooled by its head)."""

    def __init__(self, model: nn.Module, name: str, weights_hash: str,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        p = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        p = int(p[0] if isinstance(p, (tuple, list)) else p) if p is not None else 1
        dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        super().__init__(model, name, weights_hash, mean, std, (p,), p, dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls = getattr(model, "cls_token", None) is not None

    def _features(self, x: torch.Tensor, patch_size: int | None) -> dict:
        if patch_size is not None and int(patch_size) != self.default_patch_size:
            raise OpenPlutoError(
                f"timm model '{self.name}' runs at patch size {self.default_patch_size} only, "
                f"not {patch_size}")
        tokens = self.backbone.forward_features(x)
        if tokens.ndim == 4:  # NCHW feature map (CNNs) or NHWC
            if tokens.shape[1] == self.embed_dim and tokens.shape[-1] != self.embed_dim:
                tokens = tokens.permute(0, 2, 3, 1)
            grid = (tokens.shape[1], tokens.shape[2])
            patch = tokens.flatten(1, 2)
            return {"cls": self.backbone.forward_head(tokens.permute(0, 3, 1, 2), pre_logits=True),
                    "registers": patch[:, :0], "patch": patch, "grid": grid}
        npt = self.num_prefix_tokens
        p = self.default_patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        pooled = self.backbone.forward_head(tokens, pre_logits=True)
        patch = tokens[:, npt:]
        if patch.shape[1] != grid[0] * grid[1]:
            grid = (patch.shape[1], 1)
        return {"cls": pooled, "registers": tokens[:, int(self.has_cls):npt], "patch": patch, "grid": grid}


def _parse_value(text: str):
    """``"8"`` -> 8, ``"1e-5"`` -> 1e-05, ``"true"`` -> True, ``"[0.5,0.5]"`` -> list, else the string."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=1,mean=[0.5,0.5,0.5]"`` -> ``["a=1", "mean=[...]"]``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_timm_spec(spec: str) -> tuple[str, str, dict]:
    """``timm:NAME:PATH[:k=v,...]`` -> (NAME, PATH, kwargs). PATH may be empty."""
    body = spec[len("timm:"):]
    name, _, rest = body.partition(":")
    if not name:
        raise OpenPlutoError(f"encoder spec '{spec}' has no model name (use timm:MODEL_NAME:WEIGHTS_PATH)")
    kwargs: dict = {}
    path = rest
    head, sep, tail = rest.rpartition(":")
    if sep and "=" in tail:
        path = head
        for item in _split_top_level(tail):
            if not item.strip():
                continue
            if "=" not in item:
                raise OpenPlutoError(f"encoder spec '{spec}': '{item}' is not key=value")
            k, v = item.split("=", 1)
            kwargs[k.strip()] = _parse_value(v.strip())
    elif "=" in rest and ":" not in rest:
        raise OpenPlutoError(f"encoder spec '{spec}': put key=value options after the weights path "
                             "(timm:MODEL_NAME:WEIGHTS_PATH:key=value,...)")
    return name, path, kwargs


def _load_timm_encoder(spec: str) -> Encoder:
    import timm

    name, path, kwargs = parse_timm_spec(spec)
    if not timm.is_model(name):
        raise OpenPlutoError(f"encoder spec '{spec}': '{name}' is not a timm model name "
                             "(see timm.list_models())")
    mean = kwargs.pop("mean", None)
    std = kwargs.pop("std", None)
    kwargs.setdefault("num_classes", 0)
    weights = Path(path) if path else None
    if weights is not None and weights.is_dir():
        meta_file = weights / "timm_model.json"
        if meta_file.is_file():  # an `openpluto export-timm` folder: its kwargs are the defaults
            meta = json.loads(meta_file.read_text())
            for k, v in meta.get("kwargs", {}).items():
                kwargs.setdefault(k, v)
            if meta.get("norm_eps") is not None:
                from functools import partial

                from timm.layers import LayerNorm

                kwargs.setdefault("norm_layer", partial(LayerNorm, eps=meta["norm_eps"]))
            mean = mean if mean is not None else meta.get("mean")
            std = std if std is not None else meta.get("std")
        weights = weights / WEIGHTS_NAME
    if weights is not None and not weights.is_file():
        raise OpenPlutoError(f"encoder spec '{spec}': weights file {weights} does not exist")
    try:
        if weights is None:
            logger.warning("WARNING: encoder %s has RANDOM weights (no weights path given)", name)
            model = timm.create_model(name, pretrained=False, **kwargs)
        else:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)},
                                      **kwargs)
    except TypeError as e:
        msg = " ".join(str(e).split())[:200]
        raise OpenPlutoError(f"encoder spec '{spec}': bad option for timm model '{name}' ({msg})") from None
    except RuntimeError as e:
        msg = " ".join(str(e).split())[:300]
        raise OpenPlutoError(f"encoder spec '{spec}': timm could not load {weights} ({msg})") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(std) if std is not None else tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    digest = sha256_file(weights) if weights is not None else RANDOM_INIT
    return TimmEncoder(model, f"timm:{name}", digest, mean, std)


def load_encoder(spec: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """A frozen Encoder (eval mode, no grads) from a model dir, a preset name or a ``timm:`` spec."""
    spec_s = str(spec)
    if not spec_s.startswith("timm:") and (Path(spec_s) / "timm_model.json").is_file():
        meta = json.loads((Path(spec_s) / "timm_model.json").read_text())  # an `export-timm` folder
        spec_s = f"timm:{meta['model_name']}:{spec_s}"
    if spec_s.startswith("timm:"):
        enc = _load_timm_encoder(spec_s)
    elif is_model_dir(spec_s):
        path = Path(spec_s)
        model = load_pretrained(path)
        enc = PlutoEncoder(model, model.cfg.name if model.cfg.name != "custom" else path.name,
                           sha256_file(path / WEIGHTS_NAME))
    elif spec_s in list_models():
        logger.warning("WARNING: encoder '%s' is a preset with RANDOM weights (use a model directory "
                       "from `openpluto export` for real features)", spec_s)
        enc = PlutoEncoder(build_model(spec_s), spec_s, RANDOM_INIT)
    elif Path(spec_s).exists():
        load_pretrained(spec_s)  # raises the precise reason (no config.json, ...)
        raise OpenPlutoError(f"cannot load encoder from {spec_s}")  # pragma: no cover
    else:
        raise OpenPlutoError(
            f"encoder '{spec_s}' is not a model directory, a preset ({', '.join(list_models())}) "
            "or a timm spec (timm:MODEL_NAME:WEIGHTS_PATH[:key=value,...])")
    return enc.to(device).eval()

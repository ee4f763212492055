"""AdamW parameter groups: weight-decay exclusions, layer-wise lr decay, patch-embed lr, last-layer freeze.

Parameter names are those of the student (``backbone.blocks.3.attn.qkv.weight``,
``dino_head.last_layer.weight``, ...); a DDP ``module.`` or compile ``_orig_mod.`` prefix is ignored.

- no weight decay: 1-d tensors (norm weights, biases, LayerScale gammas) and tokens/positional
  embeddings (``cls_token``, ``reg_token``, ``mask_token``, ``pos_embed``, plus the backbone's
  ``no_weight_decay()``);
- layer-wise lr decay: ``lr_mult = decay ** (depth + 1 - layer_id)`` with layer 0 = patch embedding and
  tokens, layer i+1 = ``blocks.{i}``, layer depth+1 = final norm and heads;
- ``patch_embed`` parameters get an extra lr multiplier;
- ``dino_head.last_layer`` is flagged so its lr can be held at 0 during the first steps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

_TOKEN_NAMES = ("cls_token", "reg_token", "register_tokens", "mask_token", "pos_embed")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def clean_name(name: str) -> str:
    """Drop wrapper prefixes (DDP ``module.``, compile ``_orig_mod.``) from a parameter name."""
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


def layer_id(name: str, depth: int) -> int:
    """Layer index of a student parameter for layer-wise lr decay (0 .. depth + 1)."""
    m = _BLOCK_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    short = name.split(".")[-1]
    if "patch_embed" in name or short in _TOKEN_NAMES:
        return 0
    return depth + 1


def no_weight_decay(name: str, param: torch.Tensor, extra: Iterable[str] = ()) -> bool:
    """True for parameters excluded from weight decay (norms, biases, LayerScale, tokens)."""
    short = name.split(".")[-1]
    if param.ndim <= 1 or name.endswith(".bias") or short in _TOKEN_NAMES:
        return True
    return any(name.endswith(e) for e in extra)


def param_groups(
    student: nn.Module,
    depth: int,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    no_wd_names: Iterable[str] = (),
) -> list[dict]:
    """Group the student's trainable parameters by (lr_mult, wd_mult, is_last_layer).

    Each group dict holds ``params``, ``lr_mult``, ``wd_mult``, ``is_last_layer`` and ``names``
    (a sorted list of parameter names, plain strings, so the optimizer state stays weights_only-safe).
    """
    extra = tuple(no_wd_names)
    groups: dict[tuple, dict] = {}
    for raw, p in student.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(raw)
        lr_mult = layerwise_decay ** (depth + 1 - layer_id(name, depth))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if no_weight_decay(name, p, extra) else 1.0
        last = "last_layer" in name
        key = (round(lr_mult, 12), wd_mult, last)
        g = groups.setdefault(
            key, {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "is_last_layer": last}
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    groups: list[dict],
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``groups`` (lr and weight decay are set every step by :func:`apply_schedule`)."""
    for g in groups:
        g.setdefault("lr", 0.0)
        g.setdefault("weight_decay", 0.0)
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, weight_decay=0.0, fused=fused)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr (``lr * lr_mult``; last layer uses ``last_layer_lr``) and weight decay."""
    for g in optimizer.param_groups:
        base = last_layer_lr if g.get("is_last_layer") else lr
        g["lr"] = base * g.get("lr_mult", 1.0)
        g["weight_decay"] = wd * g.get("wd_mult", 1.0)

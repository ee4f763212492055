"""PlutoViT <-> timm: export a model at one patch size to timm's own ViT classes, and import back.

Export targets (timm's own classes, loadable with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...), **kwargs)`` or ``timm.create_model("local-dir:OUT")``):

- ``pos_embed="rope"``  -> timm ``Eva`` as in ``vit_small_patch16_dinov3`` (DINOv3: 2D RoPE, registers,
  LayerScale). openpluto's blocks *are* timm ``EvaBlock``s and its RoPE *is* timm's
  ``RotaryEmbeddingDinoV3``, so the only conversions are the PI-resized kernel and dropping
  ``mask_token`` (pretraining only).
- ``pos_embed="learned"`` -> timm ``VisionTransformer`` as in ``vit_*_patch14_reg4_dinov2`` (DINOv2 with
  registers; ``no_embed_class``). EVA attention has no key bias, so ``qkv.bias = [q_bias, 0, v_bias]``;
  ``gamma_1/2`` become ``ls1/ls2.gamma``. The timm model's ``img_size`` is set to
  ``grid * patch_size`` (grid = openpluto's reference grid) so that both resample the same
  position table the same way at every input size.

A FlexiViT model is exported at one patch size ``P``: the stored kernel is PI-resized to ``P x P``
(exactly what openpluto does in its forward), so timm at ``P`` gives the same outputs.

Import (``pluto_from_timm``) reads a timm ViT/DINOv2/DINOv3 state dict (``.safetensors`` or a
``weights_only`` torch file) and builds the equivalent PlutoViT. Dropping a key bias is exact (softmax
is shift invariant per query row); a position-table row for cls/register tokens is folded into those
tokens (exact: both are constants added before the first block).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from openpluto.errors import OpenPlutoError
from openpluto.io import atomic_path, write_json_atomic, write_text_atomic
from openpluto.model.config import RESIZE_INTERPOLATION, ModelConfig
from openpluto.model.hub import load_pretrained, load_state_dict_file, load_state_dict_strict
from openpluto.model.vit import PlutoViT

TIMM_META = "timm_model.json"
TIMM_WEIGHTS = "model.safetensors"

# Closest timm model for each width (only used as the name; every architecture field is passed).
_DINOV3_NAMES = {384: "vit_small_patch16_dinov3", 768: "vit_base_patch16_dinov3",
                 1024: "vit_large_patch16_dinov3"}
_DINOV2_NAMES = {384: "vit_small_patch14_reg4_dinov2", 768: "vit_base_patch14_reg4_dinov2",
                 1024: "vit_large_patch14_reg4_dinov2", 1536: "vit_giant_patch14_reg4_dinov2"}
_TIMM_NORM_EPS = {"eva": 1e-5, "vit": 1e-6}  # what the chosen timm names use
_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}


def _ratio_arg(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` with ``int(dim * ratio) == hidden`` despite float rounding."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


def timm_model_args(cfg: ModelConfig, patch_size: int) -> tuple[str, dict[str, Any]]:
    """(timm model name, ``create_model`` kwargs) of the timm model equal to ``cfg`` at ``patch_size``."""
    d = cfg.embed_dim
    hidden = int(d * cfg.mlp_ratio)
    common: dict[str, Any] = {
        "patch_size": patch_size,
        "embed_dim": d,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "qkv_bias": cfg.qkv_bias,
        # timm drops None kwargs, so "no LayerScale" is exported as LayerScale fixed at 1 (identical)
        "init_values": cfg.layerscale_init if cfg.layerscale_init is not None else 1.0,
        "num_classes": 0,
        "global_pool": "token",
        "dynamic_img_size": True,
    }
    if cfg.pos_embed == "rope":
        name = _DINOV3_NAMES.get(d, "vit_small_patch16_dinov3")
        kwargs = {
            **common,
            "img_size": cfg.img_size,
            "mlp_ratio": _ratio_arg(hidden, d),
            "swiglu_mlp": cfg.ffn == "swiglu",
            "num_reg_tokens": cfg.num_registers,
            "rope_temperature": cfg.rope_temperature,
        }
    else:
        swiglu = cfg.ffn == "swiglu"
        name = ("vit_giant_patch14_reg4_dinov2" if swiglu
                else _DINOV2_NAMES.get(d, "vit_small_patch14_reg4_dinov2"))
        grid = cfg.img_size // cfg.patch_size
        kwargs = {
            **common,
            "img_size": grid * patch_size,
            "mlp_ratio": _ratio_arg(2 * hidden if swiglu else hidden, d),
            "reg_tokens": cfg.num_registers,
            "no_embed_class": True,
        }
    return name, kwargs


def _family(cfg: ModelConfig) -> str:
    return "eva" if cfg.pos_embed == "rope" else "vit"


def timm_state_dict(model: PlutoViT, patch_size: int) -> dict[str, torch.Tensor]:
    """The state dict of the timm model of ``timm_model_args`` (tensors on CPU)."""
    if patch_size not in model.patch_sizes:
        raise OpenPlutoError(f"patch size {patch_size} is not one of the model's {list(model.patch_sizes)}")
    src = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "mask_token"}
    with torch.no_grad():
        src["patch_embed.proj.weight"] = model.patch_embed.kernel(patch_size).detach().cpu().contiguous()
    if model.cfg.layerscale_init is None:
        for i in range(model.cfg.depth):
            src[f"blocks.{i}.gamma_1"] = torch.ones(model.embed_dim)
            src[f"blocks.{i}.gamma_2"] = torch.ones(model.embed_dim)
    if model.cfg.pos_embed == "rope":
        return src
    out = {}
    for k, v in src.items():
        if k.endswith(".attn.q_bias"):
            vb = src[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), vb])
            continue
        if k.endswith(".attn.v_bias"):
            continue
        k = re.sub(r"\.gamma_1$", ".ls1.gamma", k)
        k = re.sub(r"\.gamma_2$", ".ls2.gamma", k)
        out[k] = v
    return out


def _python_snippet(name: str, kwargs: dict[str, Any], eps: float | None, weights: str) -> str:
    args = ",\n    ".join(f"{k}={v!r}" for k, v in kwargs.items())
    lines = ["import timm"]
    if eps is not None:
        lines += ["from functools import partial", "from timm.layers import LayerNorm"]
        args += f",\n    norm_layer=partial(LayerNorm, eps={eps!r})"
    lines += ["", "model = timm.create_model(", f"    {name!r},", "    pretrained=True,",
              f"    pretrained_cfg_overlay=dict(file={weights!r}),", f"    {args},", ").eval()"]
    return "\n".join(lines)


def export_timm(
    model_or_dir: PlutoViT | str | os.PathLike, patch_size: int | None, out_dir: str | os.PathLike
) -> Path:
    """Write a timm checkpoint of the model at ``patch_size`` into ``out_dir``; return ``out_dir``.

    Files: ``model.safetensors`` (timm state dict), ``config.json`` (timm hub format, so
    ``timm.create_model("local-dir:OUT", pretrained=True)`` works when every argument is JSON),
    ``timm_model.json`` (name + kwargs) and ``README.md`` (the exact Python call).
    """
    from safetensors.torch import save_file

    model = model_or_dir if isinstance(model_or_dir, PlutoViT) else load_pretrained(model_or_dir)
    cfg = model.cfg
    p = model.default_patch_size if patch_size is None else int(patch_size)
    name, kwargs = timm_model_args(cfg, p)
    state = timm_state_dict(model, p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TIMM_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    eps = cfg.eps if abs(cfg.eps - _TIMM_NORM_EPS[_family(cfg)]) > 1e-12 else None
    weights = str((out / TIMM_WEIGHTS).resolve())
    snippet = _python_snippet(name, kwargs, eps, weights)
    meta = {
        "model_name": name,
        "kwargs": kwargs,
        "file": TIMM_WEIGHTS,
        "patch_size": p,
        "norm_eps": eps,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "source": {"name": cfg.name, "patch_sizes": list(cfg.patch_sizes), "pos_embed": cfg.pos_embed},
        "python": snippet,
    }
    write_json_atomic(out / TIMM_META, meta)
    if eps is None:
        hub_cfg = {
            "architecture": name,
            "num_classes": 0,
            "num_features": cfg.embed_dim,
            "global_pool": "token",
            "model_args": kwargs,
            "pretrained_cfg": {
                "input_size": [3, cfg.img_size, cfg.img_size],
                "fixed_input_size": False,
                "interpolation": RESIZE_INTERPOLATION,
                "crop_pct": 1.0,
                "mean": list(cfg.mean),
                "std": list(cfg.std),
                "num_classes": 0,
                "license": "see the source model",
            },
        }
        write_json_atomic(out / "config.json", hub_cfg)
    local = (f"\nOr, with every argument read from `config.json`:\n\n```python\nimport timm\n"
             f"model = timm.create_model('local-dir:{out.resolve()}', pretrained=True).eval()\n```\n"
             if eps is None else "")
    readme = f"""# {cfg.name} as a timm model (patch size {p})

Exported by `openpluto export-timm` from an openpluto PlutoViT (`{cfg.name}`,
patch sizes {list(cfg.patch_sizes)}, {cfg.pos_embed} positions, {cfg.num_registers} registers).
The patch kernel is PI-resized to {p}x{p} px; this checkpoint gives the same outputs as openpluto at
patch size {p} (max abs difference <= 1e-4).

```python
{snippet}
```
{local}
- `model.forward_features(x)` -> `[B, 1 + {cfg.num_registers} + N, {cfg.embed_dim}]` tokens after the
  final norm (cls, {cfg.num_registers} registers, N patches, row-major) = openpluto `forward_features`.
- `model(x)` -> `[B, {cfg.embed_dim}]` cls token = openpluto `embed(x, patch_size={p}, pooling="cls")`.
- Input: RGB scaled to 0..1, normalised with mean {list(cfg.mean)} and std {list(cfg.std)}; any
  H, W divisible by {p} (`dynamic_img_size=True`).
"""
    write_text_atomic(out / "README.md", readme)
    return out


def create_timm_model(out_dir: str | os.PathLike):
    """Build the timm model of an ``export_timm`` folder exactly as its README says (eval mode)."""
    import timm

    out = Path(out_dir)
    meta_path = out / TIMM_META
    if not meta_path.is_file():
        raise OpenPlutoError(f"{meta_path} is missing: {out} is not an `openpluto export-timm` folder")
    meta = json.loads(meta_path.read_text())
    kwargs = dict(meta["kwargs"])
    if meta.get("norm_eps") is not None:
        from functools import partial

        from timm.layers import LayerNorm

        kwargs["norm_layer"] = partial(LayerNorm, eps=meta["norm_eps"])
    return timm.create_model(meta["model_name"], pretrained=True,
                             pretrained_cfg_overlay={"file": str(out / meta["file"])}, **kwargs).eval()


# ----------------------------------------------------------------------------------------- import


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "backbone.", "model.", "visual.trunk."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def pluto_from_timm(
    source: str | os.PathLike | dict[str, torch.Tensor],
    num_heads: int | None = None,
    **overrides: Any,
) -> PlutoViT:
    """A PlutoViT initialised from a timm ViT state dict (VisionTransformer or DINOv3-style Eva).

    ``source``: a state dict or a ``.safetensors`` / torch file. ``num_heads`` cannot be read from
    tensor shapes; it defaults to the standard count for the width (384 -> 6, 768 -> 12, ...).
    ``overrides`` are ModelConfig fields (e.g. ``patch_sizes=(8, 16, 32)`` to run a /16 model at
    several patch sizes: the stored kernel stays the timm one, PI-resized on the fly; name, mean, std).
    """
    where = str(source) if not isinstance(source, dict) else "timm state dict"
    state = dict(source) if isinstance(source, dict) else load_state_dict_file(source)
    state = _strip_prefix(state)
    for k in list(state):  # classifier head, pretraining-only and non-persistent tensors
        if k.startswith(("head.", "rope.")) or k == "mask_token" or k.endswith((".periods", ".bias_mask")):
            state.pop(k)
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise OpenPlutoError(f"{where} is not a timm ViT state dict (no cls_token / patch_embed.proj.weight)")
    if "storage_tokens" in state:  # original DINOv3 naming
        state["reg_token"] = state.pop("storage_tokens")
    d = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    w = state["patch_embed.proj.weight"]
    p = int(w.shape[-1])
    regs = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    heads = num_heads or _STANDARD_HEADS.get(d)
    if heads is None:
        raise OpenPlutoError(f"{where}: cannot tell the number of attention heads of a {d}-wide ViT; "
                             "pass num_heads")
    fc1 = state["blocks.0.mlp.fc1.weight"].shape[0]
    fc2_in = state["blocks.0.mlp.fc2.weight"].shape[1]
    swiglu = fc1 == 2 * fc2_in
    eva = "blocks.0.attn.qkv.bias" not in state and "blocks.0.ls1.gamma" not in state
    qkv_bias = "blocks.0.attn.q_bias" in state or "blocks.0.attn.qkv.bias" in state
    layerscale = "blocks.0.gamma_1" in state or "blocks.0.ls1.gamma" in state

    out: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {
        "name": "timm-import", "embed_dim": d, "depth": depth, "num_heads": heads, "patch_size": p,
        "patch_sizes": (p,), "patch_kernel_size": p, "num_registers": regs, "qkv_bias": qkv_bias,
        "ffn": "swiglu" if swiglu else "mlp", "mlp_ratio": _ratio_arg(fc2_in if swiglu else fc1, d),
        "layerscale_init": 1e-5 if layerscale else None,
    }
    if "pos_embed" in state:
        pos = state.pop("pos_embed")
        n = pos.shape[1]
        n_prefix = next((t for t in (0, 1, 1 + regs) if math.isqrt(n - t) ** 2 == n - t), None)
        if n_prefix is None:
            raise OpenPlutoError(f"{where}: pos_embed of {n} rows is not a square grid (+ prefix tokens)")
        grid = math.isqrt(n - n_prefix)
        if n_prefix >= 1:
            state["cls_token"] = state["cls_token"] + pos[:, :1]
        if n_prefix > 1:
            state["reg_token"] = state["reg_token"] + pos[:, 1:n_prefix]
        out["pos_embed"] = pos[:, n_prefix:]
        fields.update(pos_embed="learned", img_size=grid * p)
    else:
        fields.update(pos_embed="rope")
    if not eva:
        fields.setdefault("norm_eps", 1e-6)
    for k, v in state.items():
        if k.endswith(".attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            out[k.replace("qkv.bias", "q_bias")] = q
            out[k.replace("qkv.bias", "v_bias")] = vb
            continue
        k = re.sub(r"\.ls1\.gamma$", ".gamma_1", k)
        k = re.sub(r"\.ls2\.gamma$", ".gamma_2", k)
        out[k] = v
    fields.update(overrides)
    from openpluto.config import from_dict

    cfg = from_dict(ModelConfig, fields)
    model = PlutoViT(cfg)
    if "mask_token" not in out:
        out["mask_token"] = torch.zeros_like(model.mask_token)
    if cfg.kernel_size != p:
        from timm.layers import resample_patch_embed

        kernel = out["patch_embed.proj.weight"]
        out["patch_embed.proj.weight"] = resample_patch_embed(kernel, [cfg.kernel_size] * 2)
    load_state_dict_strict(model, out, where)
    return model.eval()

"""2D RoPE applied to queries and keys: one table for all tokens, a reference path and a fused path.

The maths is DINOv3's rotate-half RoPE, ``x * cos + rotate_half(x) * sin`` with
``rotate_half([x1, x2]) = [-x2, x1]``, written as ``x * cos + roll_half(x) * sin_signed`` with
``roll_half([x1, x2]) = [x2, x1]`` and ``sin_signed = [-sin1, sin2]``. The table spans every token
and is the identity on the cls/register rows (cos 1, sin 0), so q and k are rotated in one pass
instead of slicing the prefix off, rotating and concatenating back.

- ``apply_rope``: the reference (eager, any layout; the CPU path of ``PlutoBlock``).
- ``rope_qk``: q and k of a ``[B, T, 3, H, hd]`` qkv projection (``[B, T, 2, H, hd]``, a view) rotated in
  one pass, in the compute
  dtype (fp32 maths inside). Inside a ``torch.compile``d region it is plain tensor code that inductor
  fuses with its neighbours; in eager mode on CUDA it runs as one compiled (inductor/Triton)
  element-wise kernel, built once with dynamic shapes, so its input is read once and only the
  rotated q and k are written (no fp32 copies of q/k, no ``roll`` copy). Where inductor cannot be
  used (no Triton or no C compiler, or ``OPENPLUTO_FUSED_ROPE=0``) the same function runs eagerly.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

logger = logging.getLogger(__name__)


def rope_tables(rope_embed: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """timm ``RotaryEmbeddingDinoV3.get_embed`` output ``[N, 2 * hd]`` (sin, cos) -> ``[2, P + N, hd]``
    (cos, signed sin) covering the ``P`` prefix tokens too (cos 1, sin 0: not rotated)."""
    sin, cos = rope_embed.chunk(2, dim=-1)
    hd = sin.shape[-1]
    sign = torch.ones(hd, dtype=sin.dtype, device=sin.device)
    sign[: hd // 2] = -1
    table = torch.stack([cos, sin * sign])  # [2, N, hd]
    prefix = torch.zeros(2, num_prefix_tokens, hd, dtype=table.dtype, device=table.device)
    prefix[0] = 1.0
    return torch.cat([prefix, table], dim=1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Reference: rotate ``x`` ``[..., T, hd]`` with ``rope_tables`` output ``[2, T, hd]``."""
    cos, sin = table[0], table[1]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def rope_qk_math(qk: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``qk`` ``[B, T, 2, H, hd]`` (any float dtype) -> the same, rotated; fp32 maths, result in
    ``qk.dtype``. ``table``: ``rope_tables`` output ``[2, T, hd]`` (fp32)."""
    x = qk.float()
    half = x.shape[-1] // 2
    cos = table[0][:, None, None, :]  # [T, 1, 1, hd]
    sin = table[1][:, None, None, :]
    rolled = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rolled * sin).to(qk.dtype)


_fused = None  # the compiled rope_qk_math, built on first use
_fused_state = {"enabled": None}  # None: not decided yet


def fused_rope_available() -> bool:
    """True where the compiled RoPE kernel can be built for CUDA tensors: Triton and a C compiler
    present (Triton builds a small launcher with it) and ``OPENPLUTO_FUSED_ROPE`` is not ``0``."""
    if _fused_state["enabled"] is None:
        ok = os.environ.get("OPENPLUTO_FUSED_ROPE", "1") != "0"
        if ok:
            try:
                from torch.utils._triton import has_triton

                ok = bool(has_triton())
            except ImportError:  # pragma: no cover - very old torch
                ok = False
        if ok:
            ok = any(shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c)
        _fused_state["enabled"] = ok
    return bool(_fused_state["enabled"])


def compiled_rope_qk():
    """``rope_qk_math`` compiled once with dynamic shapes (one kernel for every batch, grid and head)."""
    global _fused
    if _fused is None:
        _fused = torch.compile(rope_qk_math, dynamic=True, fullgraph=True)
    return _fused


def rope_qk(qk: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotated ``qk`` ``[B, T, 2, H, hd]`` (q and k of a ``[B, T, 3, H, hd]`` projection), same shape
    and dtype.

    Compiled region: plain code (inductor fuses it). Eager CUDA: the compiled kernel when available
    (a failure to build it is logged once and the eager maths used from then on). Otherwise eager.
    """
    if torch.compiler.is_compiling() or not qk.is_cuda or not fused_rope_available():
        return rope_qk_math(qk, table)
    try:
        return compiled_rope_qk()(qk, table)
    except Exception as e:  # noqa: BLE001 - any inductor/Triton build failure: fall back, once
        _fused_state["enabled"] = False
        logger.warning("fused RoPE kernel unavailable (%s: %s); using the eager path",
                       type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return rope_qk_math(qk, table)

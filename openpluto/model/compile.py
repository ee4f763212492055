"""``maybe_compile(module, enabled)``: the one compile switch of training, embedding and evaluation.

What is compiled: every transformer block of every backbone inside ``module`` (a ``PlutoViT``, an
``SSLMetaArch`` with student and teacher, an ``Encoder``; a timm backbone without ``blocks`` is
compiled whole), each with ``nn.Module.compile`` so parameter names, ``state_dict`` and checkpoints
do not change. Patch embedding, positions and heads stay eager (small, and they hold the Python-side
caches). All blocks of a backbone share one compiled graph per input shape and grad mode, so a
FlexiViT trained at patch 8/16/32 compiles three shapes (per crop size and grad mode) during warm-up
and never again: shapes are static (``dynamic=False``) and the recompile limit is raised to hold
them all. Frozen encoders pad a short last batch up to the largest batch seen (and drop the padding
rows), so the tail of a slide does not add a shape either.

Backend: inductor (Triton on CUDA, C++ on CPU; both need a C compiler), or the environment variable
``OPENPLUTO_COMPILE_BACKEND`` (e.g. ``aot_eager``: traces without generating code, to tell a
compiler problem from a model problem; the tests use it to count graphs quickly).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # shapes per compiled code object: patch sizes x crop sizes x grad modes x batches


def _raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * limit)


def _backbones(module: nn.Module) -> list[nn.Module]:
    """The modules whose blocks get compiled: PlutoViTs, and the backbones of timm encoders."""
    from openpluto.model.encoder import TimmEncoder
    from openpluto.model.vit import PlutoViT

    found = []
    for m in module.modules():
        if isinstance(m, PlutoViT):
            found.append(m)
        elif isinstance(m, TimmEncoder):
            found.append(m.backbone)
    return found


def maybe_compile(
    module: nn.Module, enabled: bool, *, backend: str | None = None, mode: str | None = None
) -> nn.Module:
    """Compile the transformer blocks inside ``module`` in place when ``enabled``; returns ``module``.

    Idempotent. ``mode`` is ``torch.compile``'s (None: default; ``"max-autotune-no-cudagraphs"``
    autotunes the matmuls at a much longer warm-up).
    """
    if not enabled:
        return module
    from openpluto.model.encoder import Encoder

    backend = backend or os.environ.get("OPENPLUTO_COMPILE_BACKEND") or "inductor"
    _raise_recompile_limit()
    backbones = _backbones(module)
    if not backbones:
        logger.warning("compile: no transformer backbone found in %s; compiling it whole",
                       type(module).__name__)
        backbones = [module]
    for bb in backbones:
        blocks = getattr(bb, "blocks", None)
        targets = list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else [bb]
        for blk in targets:
            if not getattr(blk, "_openpluto_compiled", False):
                blk.compile(backend=backend, mode=mode, dynamic=False)
                blk._openpluto_compiled = True
    for m in module.modules():
        if isinstance(m, Encoder):
            m.pad_batches = True
    return module


def is_compiled(module: nn.Module) -> bool:
    """True if ``maybe_compile`` compiled blocks inside ``module``."""
    return any(getattr(m, "_openpluto_compiled", False) for m in module.modules())

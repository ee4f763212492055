"""Student/teacher meta-architecture of DINOv2-style pretraining (Oquab et al. 2024).

``SSLMetaArch(backbone, cfg)`` holds

- ``student``: :class:`SSLNet` (``backbone`` + ``dino_head`` [+ ``ibot_head`` when separate]), trained;
- ``teacher``: a deep copy of the student, in eval mode without gradients, updated only by EMA
  (:meth:`SSLMetaArch.update_teacher`);
- the centering buffers (softmax centering) and the three losses.

One step (``meta(batch, patch_size, teacher_temp, generator)``) on float views (:class:`BatchAugment`):

1. iBOT masks ``[n_global*B, h*w]`` for the step's patch grid (``batch["masks"]``, drawn by the loader
   workers, or drawn here from ``generator``).
2. Teacher (no grad) on the unmasked global crops -> CLS and masked-patch logits (the head divides by
   ``teacher_temp`` on its prototypes) -> Sinkhorn-Knopp (or softmax-centred) targets, in float32.
3. Student on the masked global crops and the local crops -> CLS logits of every crop (divided by
   the student temperature the same way), patch logits at the masked positions, backbone CLS of the
   global crops.
4. Losses in float32 (autocast off): DINO local (student local vs teacher global) and global
   (student global i vs teacher global j != i), both divided by the number of pairs; iBOT on masked
   patches; KoLeo on the student CLS of each global crop. ``total`` is their weighted sum.

The trainer may replace ``meta.student`` by ``DDP(meta.student)`` or ``fully_shard`` it in place:
this class only calls ``self.student(...)`` for the student pass and unwraps ``.module`` when it needs
parameters.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from openpluto.distributed import unwrap
from openpluto.errors import ConfigError, OpenPlutoError
from openpluto.ssl.centering import SoftmaxCentering, sinkhorn_knopp
from openpluto.ssl.config import SSLConfig
from openpluto.ssl.heads import DINOHead
from openpluto.ssl.image_ops import to_device
from openpluto.ssl.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from openpluto.ssl.masking import sample_masks

# Wrapper segments added to parameter names by DDP, torch.compile, activation checkpointing, FSDP1.
_WRAPPER_SEGMENT = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def _reshard(module: nn.Module) -> None:
    """Put fully_shard-ed (FSDP2) modules back in their sharded state, so that parameters are the
    DTensor shards (a root module, e.g. the no-grad teacher, stays unsharded after its forward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _canonical(name: str) -> str:
    prev = None
    while prev != name:
        prev, name = name, _WRAPPER_SEGMENT.sub(r"\1", name)
    return name


class SSLNet(nn.Module):
    """Backbone + heads; the student and the teacher are both of this class.

    Children: ``backbone`` (PlutoViT), ``dino_head`` (:class:`DINOHead`), and ``ibot_head`` only when
    iBOT uses a separate head (``shared_head`` is False); with a shared head the DINO head also
    projects the masked patch tokens (one head call for all tokens).
    """

    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.shared_head = ibot_head is None
        if ibot_head is not None:
            self.ibot_head = ibot_head

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        patch_size: int | None = None,
        mask_inputs: bool = True,
        mask_indices: torch.Tensor | None = None,
        logit_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Run the backbone and heads.

        Args:
            global_crops: ``[n_global*B, 3, G, G]``; local_crops: ``[n_local*B, 3, L, L]`` or None.
            masks: ``[n_global*B, N]`` bool iBOT masks or None. With ``mask_inputs`` (student) the
                masked tokens are replaced by the mask token; without (teacher) the backbone sees the
                whole crop and the masks only select which patch tokens go through the head.
            patch_size: the step's patch size (None: the backbone default).
            mask_indices: optional ``masks.flatten().nonzero()[:, 0]`` computed beforehand (on the CPU),
                which spares the GPU a host sync for boolean indexing.
            logit_scale: multiplies the head logits (e.g. 1 / temperature), applied to the normalised
                prototypes rather than to the logits.
        Returns: ``global_cls [n_global*B, D]`` (backbone CLS), ``global_dino [n_global*B, K]``,
            ``local_dino [n_local*B, K]`` (if local crops), ``ibot [M, K']`` (if masks; M = masks.sum(),
            rows in ``patch[masks]`` order).
        """
        feats = self.backbone.forward_features(global_crops, patch_size=patch_size,
                                               masks=masks if mask_inputs else None)
        out: dict[str, torch.Tensor] = {"global_cls": feats["cls"]}
        cls_tokens = [feats["cls"]]
        n_local = 0
        if local_crops is not None and local_crops.numel():
            local_cls = self.backbone.forward_features(local_crops, patch_size=patch_size)["cls"]
            cls_tokens.append(local_cls)
            n_local = local_cls.shape[0]
        masked = None
        if masks is not None:
            patch = feats["patch"]
            if masks.shape != patch.shape[:2]:
                raise OpenPlutoError(
                    f"iBOT masks have shape {tuple(masks.shape)} but the crops give {tuple(patch.shape[:2])} "
                    f"patch tokens at patch size {patch_size}"
                )
            if mask_indices is None:
                mask_indices = masks.flatten().nonzero().flatten()
            masked = patch.flatten(0, 1).index_select(0, mask_indices)  # [M, D] == patch[masks]
        n_global = feats["cls"].shape[0]
        if self.shared_head:
            tokens = torch.cat(cls_tokens + ([masked] if masked is not None else []), dim=0)
            logits = self.dino_head(tokens, logit_scale)
            out["global_dino"] = logits[:n_global]
            if n_local:
                out["local_dino"] = logits[n_global: n_global + n_local]
            if masked is not None:
                out["ibot"] = logits[n_global + n_local:]
        else:
            logits = self.dino_head(torch.cat(cls_tokens, dim=0), logit_scale)
            out["global_dino"] = logits[:n_global]
            if n_local:
                out["local_dino"] = logits[n_global:]
            if masked is not None:
                out["ibot"] = self.ibot_head(masked, logit_scale)
        return out


@contextlib.contextmanager
def _quiet_fsdp_views():
    """FSDP2 warns when a sharded module returns views (our row slices of one head call); the outputs
    are only used out-of-place, so that warning is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        yield


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_k p log p (nats)."""
    return -(p * torch.log(p.clamp(min=1e-12))).sum(dim=-1).mean()


class SSLMetaArch(nn.Module):
    """DINOv2-style student + EMA teacher with DINO, iBOT and KoLeo losses.

    Args:
        backbone: a PlutoViT (``forward_features``, ``embed_dim``, ``patch_sizes``); it becomes the
            student's backbone, and a deep copy the teacher's.
        cfg: :class:`~openpluto.ssl.config.SSLConfig`.
        patch_sizes: the patch sizes the trainer will use (default: all of ``backbone.patch_sizes``);
            the crop sizes must be divisible by each (ConfigError otherwise).
    """

    def __init__(self, backbone: nn.Module, cfg: SSLConfig, patch_sizes: Sequence[int] | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        sizes = tuple(patch_sizes) if patch_sizes is not None else tuple(getattr(backbone, "patch_sizes", ()))
        cfg.check_patch_sizes(sizes)
        h, lc = cfg.heads, cfg.loss
        dim = int(backbone.embed_dim)
        dino_head = DINOHead(dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.n_layers)
        self.use_ibot = cfg.uses_ibot()
        ibot_head = None
        if self.use_ibot and h.ibot_separate_head:
            ibot_head = DINOHead(dim, h.ibot_out_dim, h.ibot_hidden_dim, h.ibot_bottleneck_dim, h.n_layers)
        self.student = SSLNet(backbone, dino_head, ibot_head)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        ibot_dim = h.ibot_out_dim if ibot_head is not None else h.out_dim
        self.dino_center = SoftmaxCentering(h.out_dim, lc.center_momentum)
        self.ibot_center = SoftmaxCentering(ibot_dim, lc.center_momentum)
        # Logits reach the losses already divided by their temperature (the heads' ``logit_scale``).
        self.dino_loss = DINOLoss(1.0)
        self.ibot_loss = IBOTPatchLoss(1.0)
        self.koleo_loss = KoLeoLoss()
        self._ema_cache: tuple[tuple[int, int], list[torch.Tensor], list[torch.Tensor]] | None = None

    def train(self, mode: bool = True) -> SSLMetaArch:
        """Switch the student; the teacher always stays in eval mode (no drop-path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------ one step

    def forward(
        self,
        batch: dict[str, Any],
        patch_size: int,
        teacher_temp: float,
        generator: torch.Generator | None = None,
        update_centers: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Losses of one step on a batch of float views (:class:`~openpluto.ssl.augment.BatchAugment`).

        ``batch`` may carry precomputed iBOT ``masks`` ``[n_global*B, h*w]`` on the CPU (with their
        ``mask_indices`` and ``mask_weights``, see :func:`mask_inputs`); otherwise they are drawn from
        ``generator`` (a CPU generator). ``update_centers=False`` leaves the softmax centre as it is
        (e.g. for all but the last micro-batch of gradient accumulation).
        Returns float32 scalars: ``dino_local``, ``dino_global`` (if used), ``ibot`` (if used),
        ``koleo``, ``total`` (to backward) and detached monitors ``teacher_entropy`` (nats),
        ``student_feat_std`` (std over the batch of L2-normalised student CLS, mean over dims;
        0 means collapse), ``masked_share``. Nothing here waits for the device.
        """
        glob, loc, B = self._views(batch, patch_size)
        n_global = glob.shape[0] // B
        ps = int(patch_size)
        masks = mask_idx = mask_weights = None
        if self.use_ibot:
            grid = (glob.shape[-2] // ps, glob.shape[-1] // ps)
            masks, mask_idx, mask_weights = self._masks(batch, n_global * B, grid, generator, glob.device)

        with torch.no_grad(), _quiet_fsdp_views():
            t_dino, t_ibot = self._teacher_targets(glob, masks, mask_idx, ps, teacher_temp, update_centers)
        with _quiet_fsdp_views():
            s_out = self.student(glob, loc, masks, ps, mask_indices=mask_idx,
                                 logit_scale=1.0 / self.cfg.loss.student_temp)
        return self._losses(s_out, t_dino, t_ibot, masks, mask_weights, B, n_global)

    def _views(self, batch: dict[str, Any], patch_size: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(global crops, local crops or None, B) of a batch, checked against the step's patch size."""
        glob = batch["global_crops"]
        B = int(batch["batch_size"])
        loc = batch.get("local_crops")
        if loc is not None and loc.numel() == 0:
            loc = None
        if B < 1 or glob.shape[0] % B:
            raise OpenPlutoError(f"batch has {glob.shape[0]} global crops, not a multiple of batch_size {B}")
        if not glob.is_floating_point():
            raise OpenPlutoError("the batch holds uint8 crops: apply BatchAugment (openpluto.ssl) first")
        ps = int(patch_size)
        for name, t in (("global", glob), ("local", loc)):
            if t is not None and (t.shape[-1] % ps or t.shape[-2] % ps):
                raise ConfigError(
                    f"{name} crops of {t.shape[-2]}x{t.shape[-1]} px are not divisible by patch size {ps}; "
                    f"change crops.{name}_size or the patch sizes")
        return glob, loc, B

    def _masks(self, batch: dict[str, Any], n_images: int, grid: tuple[int, int],
               generator: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, ...]:
        """iBOT masks, flat indices of masked tokens and their weights, on ``device`` (made on the CPU)."""
        if "masks" in batch:
            parts = batch if "mask_indices" in batch else mask_inputs(batch["masks"])
        else:
            if generator is None:
                raise OpenPlutoError("SSLMetaArch needs a generator to draw iBOT masks, or batch['masks']")
            parts = mask_inputs(sample_masks(n_images, grid, self.cfg.masks, generator))
        return tuple(to_device(parts[k].cpu(), device) for k in ("masks", "mask_indices", "mask_weights"))

    @torch.no_grad()
    def _teacher_targets(self, glob: torch.Tensor, masks: torch.Tensor | None, mask_idx: torch.Tensor | None,
                         ps: int, temp: float, update: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher (unmasked global crops) -> centred DINO targets ``[n_global*B, K]`` and iBOT targets
        ``[M, K']`` for the masked tokens only, in float32."""
        sk = self.cfg.loss.centering == "sinkhorn_knopp"
        # Sinkhorn-Knopp takes logits / temp: the head divides (on its prototypes, not on the logits).
        out = self.teacher(glob, None, masks, ps, mask_inputs=False, mask_indices=mask_idx,
                           logit_scale=1.0 / temp if sk else 1.0)

        def targets(logits: torch.Tensor, center: SoftmaxCentering) -> torch.Tensor:
            if sk:
                return sinkhorn_knopp(logits, 1.0, self.cfg.loss.sinkhorn_iterations)
            probs = center(logits, temp)
            if update:
                center.update(logits)
            return probs

        t_ibot = targets(out["ibot"], self.ibot_center) if masks is not None else None
        return targets(out["global_dino"], self.dino_center), t_ibot

    def _losses(self, s_out: dict[str, torch.Tensor], t_dino: torch.Tensor, t_ibot: torch.Tensor | None,
                masks: torch.Tensor | None, mask_weights: torch.Tensor | None, B: int, n_global: int
                ) -> dict[str, torch.Tensor]:
        """The weighted DINO, iBOT and KoLeo terms and the monitors, in float32 (autocast off)."""
        lc = self.cfg.loss
        with torch.autocast(device_type=t_dino.device.type, enabled=False):
            out: dict[str, torch.Tensor] = {}
            K = t_dino.shape[-1]
            teacher_probs = t_dino.view(n_global, B, K)
            n_local = s_out["local_dino"].shape[0] // B if "local_dino" in s_out else 0
            n_pairs = n_global * n_local + (n_global * (n_global - 1) if lc.dino_global else 0)
            zero = s_out["global_dino"].sum().float() * 0.0
            total = zero
            if n_local and n_pairs:
                student_local = s_out["local_dino"].view(n_local, B, K)
                out["dino_local"] = self.dino_loss(student_local, teacher_probs) / n_pairs
            else:
                out["dino_local"] = zero
            total = total + lc.dino_weight * out["dino_local"]
            if lc.dino_global and n_global > 1:
                out["dino_global"] = self.dino_loss(
                    s_out["global_dino"].view(n_global, B, K), teacher_probs, skip_same=True) / n_pairs
                total = total + lc.dino_weight * out["dino_global"]
            if masks is not None:
                out["ibot"] = self.ibot_loss(s_out["ibot"], t_ibot, masks, mask_weights)
                total = total + lc.ibot_weight * out["ibot"]
            cls = s_out["global_cls"].float()
            koleo = sum(self.koleo_loss(c) for c in cls.chunk(n_global)) if lc.koleo_weight > 0 else zero
            out["koleo"] = koleo
            out["total"] = total + lc.koleo_weight * koleo
            with torch.no_grad():
                out["teacher_entropy"] = _entropy(t_dino).detach()
                out["student_feat_std"] = F.normalize(cls.detach(), dim=-1).std(dim=0, correction=0).mean()
                out["masked_share"] = masks.float().mean() if masks is not None else zero.detach()
        return out

    # ------------------------------------------------------------------ EMA teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student``, all parameters in one
        ``torch._foreach_lerp_``.

        Works with a DDP-wrapped or compiled student (names are matched after removing wrapper
        segments) and with fully_shard-ed (DTensor) parameters: local shards are updated in place when
        both sides are sharded alike, the student's full tensor is gathered when only it is sharded.
        The pairing of plain parameters is worked out once and reused.
        """
        _reshard(unwrap(self.student))
        _reshard(unwrap(self.teacher))
        key = (id(unwrap(self.student)), id(unwrap(self.teacher)))
        if self._ema_cache is not None and self._ema_cache[0] == key:
            teacher_list, student_list = self._ema_cache[1], self._ema_cache[2]
        else:
            teacher_list, student_list, reusable = self._ema_pairs()
            self._ema_cache = (key, teacher_list, student_list) if reusable else None
        if teacher_list:
            torch._foreach_lerp_(teacher_list, student_list, 1.0 - float(momentum))

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        """(teacher tensors, matching student tensors, whether the pairing can be reused next step)."""
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()  # type: ignore[assignment]  # noqa: N806
        student = {_canonical(n): p for n, p in unwrap(self.student).named_parameters()}
        teacher_list, student_list, reusable = [], [], True
        for name, tp in unwrap(self.teacher).named_parameters():
            key = _canonical(name)
            sp = student.get(key)
            if sp is None:
                raise OpenPlutoError(f"update_teacher: the student has no parameter '{key}' like the teacher")
            t_is, s_is = isinstance(tp, DTensor), isinstance(sp, DTensor)
            if t_is and s_is:
                tv, sv = tp.to_local(), sp.to_local()
                reusable = False
            elif s_is:
                tv, sv = tp.data, sp.full_tensor()
                reusable = False
            elif t_is:
                raise OpenPlutoError("update_teacher: the teacher is sharded, the student is not; shard both")
            else:
                tv, sv = tp.data, sp.data
            if tv.shape != sv.shape:
                raise OpenPlutoError(f"update_teacher: '{key}' has shape {tuple(tv.shape)} in the teacher "
                                     f"but {tuple(sv.shape)} in the student")
            if sv.dtype != tv.dtype:
                sv, reusable = sv.to(tv.dtype), False
            teacher_list.append(tv)
            student_list.append(sv)
        return teacher_list, student_list, reusable


def mask_inputs(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a step needs from iBOT masks ``[N, P]`` (bool), as CPU tensors: ``masks``,
    ``mask_indices`` (flat indices of the True entries, i.e. ``patch.flatten(0, 1)`` rows) and
    ``mask_weights`` (1 / masked tokens of its image, per True entry)."""
    masks = masks.cpu()
    return {
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "mask_weights": IBOTPatchLoss.token_weights(masks),
    }

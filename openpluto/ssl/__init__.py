"""openpluto.ssl: the DINOv2-style self-supervised objective for pathology tiles.

Views (multi-crop cut in the loader workers, histology augmentations applied batched on the model's
device), iBOT block masks, DINO/iBOT heads, Sinkhorn-Knopp and
softmax centering, the DINO, iBOT and KoLeo losses, and :class:`SSLMetaArch` (student + EMA teacher).
The training loop, schedules and checkpoints live in :mod:`openpluto.train`.
"""

from openpluto.ssl.augment import BatchAugment, draw_params
from openpluto.ssl.centering import SoftmaxCentering, sinkhorn_knopp
from openpluto.ssl.config import AugmentConfig, CropConfig, HeadConfig, LossConfig, MaskConfig, SSLConfig
from openpluto.ssl.heads import DINOHead, NormalizedLinear
from openpluto.ssl.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from openpluto.ssl.masking import block_mask, sample_masks
from openpluto.ssl.meta_arch import SSLMetaArch, SSLNet, unwrap
from openpluto.ssl.multicrop import MultiCropTransform, collate_multicrop
from openpluto.ssl.preview import render_views, save_views_png

__all__ = [
    "AugmentConfig",
    "BatchAugment",
    "CropConfig",
    "DINOHead",
    "DINOLoss",
    "HeadConfig",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "LossConfig",
    "MaskConfig",
    "MultiCropTransform",
    "NormalizedLinear",
    "SSLConfig",
    "SSLMetaArch",
    "SSLNet",
    "SoftmaxCentering",
    "block_mask",
    "render_views",
    "save_views_png",
    "collate_multicrop",
    "draw_params",
    "sample_masks",
    "sinkhorn_knopp",
    "unwrap",
]

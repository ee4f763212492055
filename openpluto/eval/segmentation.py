"""Semantic segmentation on frozen patch tokens with an eva-style ConvDecoderWithImage.

Data layout: ``ROOT/{train,val,test}/images/<name>.<png|jpg|tif>`` and
``ROOT/{train,val,test}/masks/<name>.png`` (same stem; single-channel PNG whose pixel values are class
ids, 0 = background). ``test`` is optional (then the validation split is reported).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from openpluto.errors import OpenPlutoError
from openpluto.eval.metrics import dice_per_image, reduce_dice

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ConvDecoderWithImage(nn.Module):
    """Patch-token map ``[B, D, h, w]`` + normalised image ``[B, 3, H, W]`` -> logits ``[B, C, H, W]``.

    2x bilinear upsample, 3x3 conv to 64 (BN, GELU), bilinear resize to the image size, concatenate the
    image, two 3x3 convs to 32 (BN, GELU), 1x1 conv to the classes.
    """

    def __init__(self, in_dim: int, num_classes: int, width: int = 64, fused_width: int = 32):
        super().__init__()
        self.tokens = nn.Sequential(nn.Conv2d(in_dim, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU())
        self.fuse = nn.Sequential(
            nn.Conv2d(width + 3, fused_width, 3, padding=1),
            nn.BatchNorm2d(fused_width),
            nn.GELU(),
            nn.Conv2d(fused_width, fused_width, 3, padding=1),
            nn.BatchNorm2d(fused_width),
            nn.GELU(),
        )
        self.classify = nn.Conv2d(fused_width, num_classes, 1)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(tokens, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.tokens(x)
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.classify(self.fuse(torch.cat([x, image], dim=1)))


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss over all classes (background included), pooled over the batch:
    ``1 - mean_c (2 sum p g + eps) / (sum p + sum g + eps)`` with ``p = softmax(logits)``."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


@dataclass
class SegSplit:
    names: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # int64 [N, H, W]


def _resize(arr: np.ndarray, size: int | None, nearest: bool) -> np.ndarray:
    from PIL import Image

    if size is None or arr.shape[:2] == (size, size):
        return arr
    im = Image.fromarray(arr)
    return np.asarray(im.resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


def load_segmentation_split(root: Path, split: str, image_size: int | None) -> SegSplit | None:
    """One split of the layout in the module doc, or None when ``ROOT/split`` is absent."""
    from PIL import Image

    d = root / split
    if not d.is_dir():
        return None
    img_dir, mask_dir = d / "images", d / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise OpenPlutoError(f"{d}: needs images/ and masks/ sub-folders")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    names, images, labels = [], [], []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
            continue
        if p.stem not in masks:
            raise OpenPlutoError(f"{p}: no mask {mask_dir}/{p.stem}.png")
        try:
            with Image.open(p) as im:
                img = np.asarray(im.convert("RGB"))
            with Image.open(masks[p.stem]) as im:
                if im.mode not in ("L", "P", "I", "I;16", "1"):
                    raise OpenPlutoError(
                        f"{masks[p.stem]}: mask must be single-channel class ids, got mode {im.mode}"
                    )
                mask = np.asarray(im).astype(np.int64)
        except OSError as e:
            raise OpenPlutoError(f"{p}: cannot read ({e})") from None
        if mask.shape != img.shape[:2]:
            raise OpenPlutoError(
                f"{masks[p.stem]}: mask {mask.shape} and image {img.shape[:2]} differ in size"
            )
        names.append(p.stem)
        images.append(_resize(img, image_size, nearest=False))
        labels.append(_resize(mask.astype(np.int32), image_size, nearest=True).astype(np.int64))
    if not names:
        raise OpenPlutoError(f"{img_dir}: no images")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise OpenPlutoError(f"{img_dir}: images differ in size {sorted(shapes)[:2]}; pass --image-size")
    return SegSplit(names, np.stack(images), np.stack(labels))


@torch.no_grad()
def token_maps(
    encoder, images: np.ndarray, patch_size: int | None, batch_size: int = 16, device: str = "cpu"
) -> torch.Tensor:
    """Frozen patch-token maps ``[N, D, H/p, W/p]`` (float32, CPU) of uint8 images ``[N, H, W, 3]``."""
    from openpluto.embed.images import normalise
    from openpluto.progress import progress

    out = []
    for i in progress(range(0, len(images), batch_size), desc="patch tokens", leave=False):
        x = normalise(
            torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2),
            encoder.mean,
            encoder.std,
            device,
        )
        f = encoder.forward_features(x, patch_size=patch_size)
        h, w = f["grid"]
        out.append(f["patch"].float().transpose(1, 2).reshape(len(x), -1, h, w).cpu())
    return torch.cat(out)


def normalised_images(images: np.ndarray, mean, std) -> torch.Tensor:
    from openpluto.embed.images import normalise

    return normalise(torch.from_numpy(images).permute(0, 3, 1, 2), mean, std)


def _scores(decoder, tokens, images, masks, num_classes, batch_size, device) -> tuple[float, torch.Tensor]:
    decoder.eval()
    per_image, preds = [], []
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            logits = decoder(tokens[i : i + batch_size].to(device), images[i : i + batch_size].to(device))
            pred = logits.argmax(1).cpu()
            preds.append(pred)
            per_image.append(dice_per_image(pred, masks[i : i + batch_size], num_classes))
    return reduce_dice(torch.cat(per_image)), torch.cat(preds)


def train_segmentation(
    train: tuple,
    val: tuple,
    test: tuple | None,
    num_classes: int,
    seed: int,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    max_steps: int = 2_000,
    val_every: int = 0,
    device: str = "cpu",
) -> dict:
    """One decoder run. Each split: (token maps [N, D, h, w], normalised images [N, 3, H, W],
    masks int64 [N, H, W]). Best step by validation mean Dice; scored on test (or val)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tok, img, msk = train
    decoder = ConvDecoderWithImage(tok.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(tok)
    every = val_every or max(1, -(-n // batch_size))
    best = (-1.0, 0, copy.deepcopy(decoder.state_dict()))
    order, pos = torch.randperm(n, generator=gen), 0
    from openpluto.progress import progress

    for step in progress(range(1, max_steps + 1), desc=f"decoder (seed {seed})", leave=False, mininterval=2):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        decoder.train()
        loss = dice_loss(decoder(tok[idx].to(device), img[idx].to(device)), msk[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == max_steps:
            score, _ = _scores(decoder, *val, num_classes, batch_size, device)
            score = -1.0 if score != score else score
            if score > best[0]:
                best = (score, step, copy.deepcopy(decoder.state_dict()))
    decoder.load_state_dict(best[2])
    dice, _ = _scores(decoder, *(test or val), num_classes, batch_size, device)
    return {"seed": seed, "steps": max_steps, "best_step": best[1], "val_dice": best[0], "dice": dice}

"""The three terms of the objective: DINO (image level), iBOT (masked patches), KoLeo (spread)."""

from openpluto.ssl.losses.dino import DINOLoss
from openpluto.ssl.losses.ibot import IBOTPatchLoss
from openpluto.ssl.losses.koleo import KoLeoLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss"]

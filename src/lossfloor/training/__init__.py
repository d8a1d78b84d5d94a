"""Training: a preset diffusers UNet behind any process/target, EMA, exact resume, gap monitor."""

from lossfloor.training.backbone import PRESETS, UNetBackbone, backbone_config
from lossfloor.training.ema import EMA
from lossfloor.training.loop import (
    Callback,
    TrainConfig,
    Trainer,
    train,
)

__all__ = [
    "EMA",
    "PRESETS",
    "Callback",
    "TrainConfig",
    "Trainer",
    "UNetBackbone",
    "backbone_config",
    "train",
]

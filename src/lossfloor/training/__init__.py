"""Training: a preset diffusers UNet behind any process/target, objectives, EMA, exact resume,
hooks (statistics, gap monitor, online gap, a user's own).

Modules: ``config`` (TrainConfig, config.json), ``loss`` (objectives), ``hooks`` (the
TrainingHook protocol), ``stats`` (stats.jsonl records), ``rundir`` (run directory,
checkpoint files), ``loop`` (the Trainer) and its parts ``order`` (data order), ``objective``
(the objective, checked), ``checkpoint`` (save, resume), ``signals`` (stop requests),
``monitor``.
"""

from lossfloor.backbone import PRESETS, UNetBackbone, backbone_config
from lossfloor.training.config import TrainConfig
from lossfloor.training.ema import EMA
from lossfloor.training.hooks import Batch, Hook, LogStep, Reducer, TrainingHook
from lossfloor.training.loop import Callback, Trainer, train
from lossfloor.training.loss import DenoisingLoss, Losses, UncertaintyLoss
from lossfloor.training.stats import SIGMA_BIN_EDGES, StatsRecord, read_stats

__all__ = [
    "EMA",
    "PRESETS",
    "SIGMA_BIN_EDGES",
    "Batch",
    "Callback",
    "DenoisingLoss",
    "Hook",
    "LogStep",
    "Losses",
    "Reducer",
    "StatsRecord",
    "TrainConfig",
    "Trainer",
    "TrainingHook",
    "UNetBackbone",
    "UncertaintyLoss",
    "backbone_config",
    "read_stats",
    "train",
]

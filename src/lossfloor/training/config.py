"""``TrainConfig`` (everything that defines a training run) and the run's config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lossfloor import __version__
from lossfloor.backbone import PRESETS, UNetBackbone, count_parameters
from lossfloor.data import Dataset
from lossfloor.diffusion.denoiser import Denoiser
from lossfloor.errors import ParameterError
from lossfloor.schedules import NoiseSchedule
from lossfloor.training.stats import SIGMA_BIN_EDGES

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Fields that may change when a run is resumed; every other field must match the checkpoint.
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "snapshot_every", "log_every")
# Fields that name a registry object: a resumed run compares what they resolve to.
RESOLVED_FIELDS = ("process", "target", "schedule")

Spec = str | dict[str, Any]
"""A process, target or schedule: a name (default parameters) or a ``to_config()`` dict."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the device is not part of it).

    ``process``, ``target`` and ``schedule`` are names or ``to_config()`` dicts (e.g.
    ``{"name": "vp", "beta_d": 10.0}``); ``sigma_data`` is the data's standard deviation, used by
    the Denoiser's input scaling, target F and EDM's λ. ``uncertainty``: EDM2's learned per-σ
    uncertainty weighting on top of the schedule (``training.loss.UncertaintyLoss``).
    """

    steps: int
    batch: int = 64
    process: Spec = "edm"
    target: Spec = "F"
    schedule: Spec = "edm"
    model: str = "small"
    conditional: bool = False
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema_halflife: float = 10_000.0
    ema_rampup: float | None = 0.05
    sigma_data: float = 0.5
    seed: int = 0
    checkpoint_every: int = 500
    snapshot_every: int = 0
    log_every: int = 10
    uncertainty: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "must be at least 1"),
            ("seed", self.seed >= 0, "must be >= 0"),
            ("batch", self.batch >= 1, "must be at least 1"),
            ("lr", 0 < self.lr <= 1, "must be in (0, 1] (AdamW moves each weight by about lr)"),
            ("warmup", self.warmup >= 0, "must be >= 0 steps"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 turns clipping off)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("ema_halflife", self.ema_halflife > 0, "must be > 0 images"),
            ("ema_rampup", self.ema_rampup is None or self.ema_rampup > 0, "must be > 0 or None"),
            ("sigma_data", 0 < self.sigma_data < float("inf"), "must be a positive number"),
            ("checkpoint_every", self.checkpoint_every >= 1, "must be at least 1 step"),
            ("snapshot_every", self.snapshot_every >= 0, "must be >= 0 (0: no snapshots)"),
            ("log_every", self.log_every >= 1, "must be at least 1 step"),
            ("model", self.model in PRESETS, f"must be one of: {', '.join(PRESETS)}"),
        ]
        for param, ok, reason in checks:
            if not ok:
                raise ParameterError(param, getattr(self, param), reason)
        target_sd = self.target.get("sigma_data") if isinstance(self.target, dict) else None
        if target_sd is not None and target_sd != self.sigma_data:
            raise ParameterError(
                "sigma_data",
                self.sigma_data,
                f"the target has sigma_data={target_sd}; use one value",
            )


def run_config(
    config: TrainConfig,
    dataset: Dataset,
    denoiser: Denoiser,
    net: UNetBackbone,
    schedule: NoiseSchedule,
    device: str,
) -> dict[str, Any]:
    """config.json: the training options and everything they resolve to (full process, target
    and schedule configs, the network, optimizer, EMA and stats bins)."""
    return {
        "lossfloor_version": __version__,
        "train": asdict(config),
        "data": dataset.describe(),
        "process": denoiser.process.to_config(),
        "target": denoiser.target.to_config(),
        "schedule": schedule.to_config(),
        "model": net.config,
        "parameters": count_parameters(net),
        "optimizer": {
            "name": "AdamW",
            "lr": config.lr,
            "betas": list(ADAM_BETAS),
            "eps": ADAM_EPS,
            "weight_decay": config.weight_decay,
            "warmup_steps": config.warmup,
            "grad_clip": config.grad_clip,
        },
        "ema": {"halflife_images": config.ema_halflife, "rampup_ratio": config.ema_rampup},
        "sigma_bin_edges": SIGMA_BIN_EDGES,
        "device": device,
    }

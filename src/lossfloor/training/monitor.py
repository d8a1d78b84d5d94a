"""A training callback that logs the gap to a cached optimal-loss curve on fixed draws."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from lossfloor.data import Dataset
from lossfloor.diagnosis import DenoiserFn, model_per_sample_loss
from lossfloor.diffusion.denoiser import as_denoiser
from lossfloor.optimal import Curve
from lossfloor.optimal.outer import OuterPlan


class GapMonitor:
    """The gap J_θ(σ) − J*(σ) at a few σ, J* from a cached curve, J_θ on fixed draws.

    Call as ``monitor(step, denoiser, record)`` (any denoiser with EDM's protocol); adds
    ``record["gap"] = {σ: J_θ − J*}``. The draws (``n`` sources and noises) are fixed at
    construction, so successive values are paired.
    """

    def __init__(
        self,
        curve: Curve,
        dataset: Dataset,
        sigmas: Sequence[float] = (0.2, 1.0, 5.0),
        n: int = 256,
        seed: int = 0,
        labels: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.sigmas = [float(s) for s in sigmas]
        self.optimal = {s: float(curve(s)) for s in self.sigmas}  # checks the grid covers σ
        self.dataset = dataset
        self.plan = OuterPlan.build(dataset.x, dataset.labels, n, seed, False)
        self.labels = dataset.labels if labels else None
        self.seconds = 0.0

    def __call__(self, step: int, denoiser: DenoiserFn, record: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        gaps = {}
        for s in self.sigmas:
            loss = model_per_sample_loss(
                as_denoiser(denoiser), self.dataset, self.plan, s, 256, self.device, self.labels
            ).mean()
            gaps[f"{s:g}"] = float(loss) - self.optimal[s]
        record["gap"] = gaps
        self.seconds += time.perf_counter() - t0

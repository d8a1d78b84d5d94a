"""A training hook that logs the gap to a cached optimal-loss curve on fixed draws, and the
per-σ-bin gap of the training losses themselves (``lossfloor.GapTracker``)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lossfloor.data import Dataset
from lossfloor.diagnosis import DenoiserFn, model_per_sample_loss
from lossfloor.diffusion.denoiser import as_denoiser
from lossfloor.errors import UserError
from lossfloor.optimal import Curve
from lossfloor.optimal.draws import OuterPlan
from lossfloor.tracker import GapTracker
from lossfloor.training.hooks import Batch, Hook, LogStep


class GapMonitor(Hook):
    """The gap J_θ(σ) − J*(σ) at a few σ, J* from a cached curve, J_θ on fixed draws.

    As a hook (``training.hooks``): every ``log_every`` steps, on the main process, it logs
    ``gap = {σ: J_θ − J*}`` of the log step's model (the trainer's EMA denoiser). As a callback:
    ``monitor(step, denoiser, record)`` (any denoiser with EDM's protocol) sets
    ``record["gap"]``. The draws (``n`` sources and noises) are fixed at construction, so
    successive values are paired. As a hook it also feeds ``tracker`` (a ``GapTracker`` on the
    curve, summed over the processes) each batch's σ and x0 losses and logs its rows as
    ``gap_bins`` once it has any: the gap of the training losses, no extra forward passes. Its
    state is the tracker's (``state_dict``: checkpointed under ``state_key``), so a resumed run
    logs what an uninterrupted one does.

    Of Gaussian items (``Dataset.std``: the curve is J* of their mixture), each fixed draw's
    x0 = m + s⊙z is the estimate's (``model_per_sample_loss``), so on the draws of an estimate
    with M = ``n`` and the same seed the optimal denoiser's J_θ is that estimate's direct form.
    """

    state_key = "gap_monitor"

    def __init__(
        self,
        curve: Curve,
        dataset: Dataset,
        sigmas: Sequence[float] = (0.2, 1.0, 5.0),
        n: int = 256,
        seed: int = 0,
        labels: bool = False,
        device: str | torch.device = "cpu",
        log_every: int = 100,
    ) -> None:
        self.device = torch.device(device)
        self.sigmas = [float(s) for s in sigmas]
        self.optimal = {s: float(curve(s)) for s in self.sigmas}  # checks the grid covers σ
        self.dataset = dataset
        self.plan = OuterPlan.build(dataset.x, dataset.labels, n, seed, False, dataset.std)
        self.labels = dataset.labels if labels else None
        self.log_every = log_every
        self.seconds = 0.0
        self.tracker = GapTracker(curve, reduce="auto")

    def gaps(self, denoiser: DenoiserFn) -> dict[str, float]:
        """{f"{σ:g}": J_θ(σ) − J*(σ)} on the fixed draws (its time added to ``seconds``)."""
        t0 = time.perf_counter()
        gaps = {}
        for s in self.sigmas:
            loss = model_per_sample_loss(
                as_denoiser(denoiser), self.dataset, self.plan, s, 256, self.device, self.labels
            ).mean()
            gaps[f"{s:g}"] = float(loss) - self.optimal[s]
        self.seconds += time.perf_counter() - t0
        return gaps

    def on_batch(self, batch: Batch) -> None:
        self.tracker.on_batch(batch)

    def on_log(self, log: LogStep) -> dict[str, Any]:
        rows = self.tracker.summary()  # on every process: it sums over them
        if not log.main:
            return {}
        seen = any(row["count"] for row in rows)
        return {"gap": self.gaps(log.model), **({"gap_bins": rows} if seen else {})}

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state (its decayed per-bin sums, this process's)."""
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s tracker state (refused for another layout)."""
        if set(state) != {"tracker"}:
            raise UserError(f"not a GapMonitor state (keys {sorted(state)})")
        self.tracker.load_state_dict(state["tracker"])

    def __call__(self, step: int, denoiser: DenoiserFn, record: dict[str, Any]) -> None:
        record["gap"] = self.gaps(denoiser)

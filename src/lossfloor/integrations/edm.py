"""EDM and EDM2 (NVlabs/edm, NVlabs/edm2): their training losses with σ reported.

EDM's ``EDMLoss`` draws ln σ ~ N(P_mean, P_std²) per image, noises y (the augmented image) as
y + n, n ~ N(0, σ²I), and returns λ(σ)·(D(y + n, σ) − y)² per element, λ = (σ² + σ_d²)/(σσ_d)²;
EDM2's ``EDM2Loss`` (no augmentation) returns (λ/e^u)·(D − y)² + u with the network's learned
log-variance u(σ) (``net(…, return_logvar=True)``). Their losses hide σ from the loop.
``EDMGapLoss`` / ``EDM2GapLoss`` are drop-in replacements: the same random calls in the same
order (so the same σ and noise for the same torch RNG state), the same returned loss, and
each batch's σ with its per-sample loss λ·mean(D − y)² (EDM's F units; EDM2: without u) goes to
a ``GapTracker`` (process "edm", target F, the loss's σ_d) and is reported per ln σ bin:

* where EDM's ``torch_utils.training_stats`` is importable (an EDM or EDM2 checkout on the
  path), as ``training_stats.report(f"Gap/sigma={σ:.3g}", gaps)``: per-sample gaps
  L_i − J*(σ_i) in x0 units, every bin on every call (an empty list where a bin has none, as
  EDM asks), so EDM's loop writes each bin's num, mean and std into its stats.jsonl;
* else into ``stats`` (a ``StatsJsonl``), whose ``write(path)`` appends one line in EDM's
  stats.jsonl format ({name: {"num", "mean", "std"}, "timestamp"}) and starts a new period.

A tracker built here from ``curve=`` leaves out (and counts in ``tracker.skipped``) the σ
EDM's unbounded lognormal draws outside the curve. In EDM's training/train.py:
``c.loss_kwargs.class_name = "lossfloor.integrations.edm.EDMGapLoss"`` with ``tracker=`` (or
``curve=``: the estimate JSON the tracker is built from).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from lossfloor.diffusion.targets import EDMF
from lossfloor.errors import UserError
from lossfloor.schedules.bins import bin_index
from lossfloor.tracker import GapTracker

Tensor = torch.Tensor


class StatsJsonl:
    """EDM's collector in small: ``report(name, values)`` adds to per-name num, Σx, Σx²;
    ``as_dict()`` gives {name: {"num", "mean", "std"}} (std = √max(E[x²] − mean², 0), 0 for one
    value, NaN for none) as EDM's ``Collector.as_dict``; ``write(path)`` appends that with a
    ``timestamp`` as one line of stats.jsonl and resets."""

    def __init__(self) -> None:
        self.moments: dict[str, list[float]] = {}

    def report(self, name: str, values: Tensor | list[float]) -> None:
        v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
        m = self.moments.setdefault(name, [0.0, 0.0, 0.0])
        m[0] += v.numel()
        m[1] += float(v.sum())
        m[2] += float(v.square().sum())

    def as_dict(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (num, total, squares) in self.moments.items():
            mean = total / num if num else math.nan
            std = (
                math.sqrt(max(squares / num - mean**2, 0.0))
                if num > 1
                else (0.0 if num else math.nan)
            )
            out[name] = {"num": num, "mean": mean, "std": std}
        return out

    def write(self, path: str | os.PathLike[str]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**self.as_dict(), "timestamp": time.time()}) + "\n")
        self.moments = {}


def edm_report() -> Callable[[str, Any], Any] | None:
    """EDM's ``torch_utils.training_stats.report`` where importable, else None."""
    try:
        from torch_utils import training_stats  # type: ignore[import-not-found]
    except ImportError:
        return None
    return training_stats.report


class _GapLoss:
    """The parts shared by EDM's and EDM2's wrappers: parameters, the tracker, the report."""

    def __init__(
        self,
        P_mean: float,
        P_std: float,
        sigma_data: float,
        tracker: GapTracker | None = None,
        curve: Any = None,
        stats: StatsJsonl | None = None,
        bins: int = 16,
    ) -> None:
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        if (tracker is None) == (curve is None):
            raise UserError(f"{type(self).__name__} needs tracker= or curve= (one of them)")
        if tracker is None:
            tracker = GapTracker(curve, process="edm", target="F", sigma_data=sigma_data,
                                 bins=bins, outside="skip")  # fmt: skip
        target = tracker.target
        if not (isinstance(target, EDMF) and target.sigma_data == sigma_data):
            raise UserError(
                f"{type(self).__name__}: the tracker must take EDM's F-unit loss (target F, "
                f"sigma_data={sigma_data}), not target {target.to_config()}"
            )
        self.tracker = tracker
        self.edm_stats = edm_report() is not None  # looked up per call: the loss stays picklable
        self.stats = stats if stats is not None or self.edm_stats else StatsJsonl()

    def observe(self, sigma: Tensor, per_sample: Tensor) -> None:
        """The tracker's update, then each bin's per-sample gaps reported (module docstring)."""
        s, loss_x0 = self.tracker.to_x0(per_sample.detach(), sigma=sigma.reshape(-1))
        self.tracker.update_x0(s, loss_x0)
        gaps = loss_x0 - self.tracker.optimal_loss(s)
        k = bin_index(s.log(), self.tracker.edges)
        report = edm_report() if self.edm_stats else None
        for b in range(self.tracker.bins):
            name = f"Gap/sigma={math.exp(float(self.tracker.centres[b])):.3g}"
            values = gaps[k == b]
            if report is not None:
                report(name, values.to(per_sample.device, torch.float32))
            elif self.stats is not None:
                self.stats.report(name, values)

    def _sigma(self, images: Tensor) -> Tensor:
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def _weight(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class EDMGapLoss(_GapLoss):
    """EDM's ``EDMLoss`` (P_mean −1.2, P_std 1.2, σ_d 0.5) with σ reported (module docstring)."""

    def __init__(
        self,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(P_mean, P_std, sigma_data, **kwargs)

    def __call__(
        self, net: Any, images: Tensor, labels: Tensor | None = None, augment_pipe: Any = None
    ) -> Tensor:
        sigma = self._sigma(images)
        weight = self._weight(sigma)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        noisy = y + torch.randn_like(y) * sigma
        loss = weight * (net(noisy, sigma, labels, augment_labels=augment_labels) - y) ** 2
        self.observe(sigma, loss.detach().flatten(1).mean(1))
        return loss


class EDM2GapLoss(_GapLoss):
    """EDM2's ``EDM2Loss`` (P_mean −0.4, P_std 1.0, σ_d 0.5) with σ reported; the tracker gets
    λ·mean(D − y)², the loss before the learned u(σ) (module docstring)."""

    def __init__(
        self,
        P_mean: float = -0.4,
        P_std: float = 1.0,
        sigma_data: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(P_mean, P_std, sigma_data, **kwargs)

    def __call__(self, net: Any, images: Tensor, labels: Tensor | None = None) -> Tensor:
        sigma = self._sigma(images)
        weight = self._weight(sigma)
        noisy = images + torch.randn_like(images) * sigma
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True)
        error = (denoised - images) ** 2
        self.observe(sigma, (weight * error).detach().flatten(1).mean(1))
        return (weight / logvar.exp()) * error + logvar

"""An optimal-loss curve J*(σ): per-σ values with standard errors, interpolation in log σ,
totals under a training objective, and the JSON contract other commands read."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lossfloor.errors import UserError
from lossfloor.io import read_json, write_json
from lossfloor.schedules import NoiseSchedule

#: Sub-intervals per grid interval for the refined quadrature that estimates the trapezoid error.
REFINE = 16


@dataclass
class Curve:
    """J*(σ) per element in VE σ and x0 units, with the record of what produced it."""

    sigmas: np.ndarray
    values: np.ndarray
    stderrs: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Curve:
        try:
            pts = sorted(record["points"], key=lambda p: p["sigma"])
            sig = np.array([p["sigma"] for p in pts], dtype=np.float64)
            val = np.array([p["optimal_loss"] for p in pts], dtype=np.float64)
            se = np.array([p.get("stderr", 0.0) for p in pts], dtype=np.float64)
        except (KeyError, TypeError):
            raise UserError(
                "not an optimal-loss curve: expected points with sigma, optimal_loss"
            ) from None
        if sig.size == 0:
            raise UserError("the optimal-loss curve has no points")
        return cls(sigmas=sig, values=val, stderrs=se, record=record)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Curve:
        return cls.from_record(read_json(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.record)

    def __call__(self, sigma: float | np.ndarray) -> np.ndarray:
        """J*(σ) by linear interpolation in ln σ; σ outside the grid is an error."""
        s = np.asarray(sigma, dtype=np.float64)
        lo, hi = self.sigmas[0], self.sigmas[-1]
        if np.any(s < lo * (1 - 1e-9)) or np.any(s > hi * (1 + 1e-9)):
            raise UserError(
                f"σ outside the optimal-loss curve's grid [{lo:g}, {hi:g}]; recompute it wider"
            )
        return np.interp(np.log(s), np.log(self.sigmas), self.values)


def total_optimal_loss(
    sigmas: np.ndarray, values: np.ndarray, stderrs: np.ndarray, schedule: NoiseSchedule
) -> dict[str, Any]:
    """E_{σ~p}[w(σ)·J*(σ)] = ∫ q(ln σ)·w(σ)·J*(σ) d ln σ over the grid.

    q·w is exact; J* is interpolated linearly in ln σ between grid points and the integral taken
    by the trapezoid rule on a grid REFINE× finer. Reported errors: ``quadrature_error`` = the
    difference to a monotone cubic (PCHIP) interpolation of J*; ``tail`` = the mass of p outside
    the grid times the end values of w·J* (added to the value, an estimate of what the grid
    misses); ``stderr`` = Σ_i c_i·se_i with c_i the integral's weight of point i (the draws are
    shared across σ, so per-σ errors are positively correlated and this sum bounds the error).
    """
    import torch
    from scipy.interpolate import PchipInterpolator

    if sigmas.size < 2:
        raise UserError("a total over a schedule needs at least 2 σ values on the grid")
    u = np.log(sigmas)
    fine_u = np.concatenate(
        [np.linspace(u[i], u[i + 1], REFINE, endpoint=False) for i in range(u.size - 1)] + [u[-1:]]
    )
    s = torch.from_numpy(np.exp(fine_u))
    qw = (schedule.density_ln_sigma(s) * schedule.weight(s)).numpy()
    weights = np.array(
        [np.trapezoid(qw * np.interp(fine_u, u, np.eye(u.size)[i]), fine_u) for i in range(u.size)]
    )
    value = float(weights @ values)
    cubic = float(np.trapezoid(qw * PchipInterpolator(u, values)(fine_u), fine_u))
    lo_s, hi_s = schedule.support()
    tail = 0.0
    for end, (a, b) in ((0, (math.log(lo_s), u[0])), (-1, (u[-1], math.log(hi_s)))):
        if b > a:
            t = np.linspace(a, b, 2001)
            mass = float(
                np.trapezoid(schedule.density_ln_sigma(torch.from_numpy(np.exp(t))).numpy(), t)
            )
            tail += mass * float(schedule.weight(float(sigmas[end]))) * float(values[end])
    return {
        "schedule": schedule.to_config(),
        "optimal_loss": value + tail,
        "stderr": float(weights @ stderrs),
        "quadrature_error": abs(cubic - value),
        "tail": tail,
        "grid": [float(sigmas[0]), float(sigmas[-1])],
    }

"""Tabulated functions of σ for the optimal-loss schedule (``schedules.optimal``): a checked
{"sigma", "value"} table (``_table``), σ* of a J* table (``sigma_star``, also read by the
report), its interpolation in ln σ (``_interp_ln``, also read by ``GapTracker``), exact
inverse-CDF draws from a density piecewise linear in ln σ (``sample_piecewise_linear``) and
the schedule's grid as a result, ``ScheduleTable`` (``lossfloor-schedule``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from lossfloor.errors import ParameterError
from lossfloor.results import Result

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Tensor = torch.Tensor


def _table(obj: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A {"sigma": [...], "value": [...]} table as sorted float64 arrays, checked."""
    try:
        s = np.asarray(obj["sigma"], dtype=np.float64)
        v = np.asarray(obj["value"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ParameterError(what, "…", 'must be {"sigma": [...], "value": [...]}') from None
    if s.ndim != 1 or s.shape != v.shape or s.size < 2:
        raise ParameterError(what, "…", "needs at least 2 (sigma, value) pairs of equal length")
    if not (np.all(np.isfinite(s)) and np.all(s > 0) and np.all(np.isfinite(v))):
        raise ParameterError(what, "…", "σ must be finite and > 0, values finite")
    order = np.argsort(s)
    s, v = s[order], v[order]
    if np.any(np.diff(s) <= 0):
        raise ParameterError(what, "…", "σ values must be distinct")
    return s, v


#: τ of the σ* rule: σ* is the smallest σ with J*(σ) ≥ τ·Var (``OptimalLossSchedule``'s default).
STAR_THRESHOLD = 0.01


def sigma_star(
    sigmas: np.ndarray, values: np.ndarray, variance: float, threshold: float = STAR_THRESHOLD
) -> float | None:
    """σ* = the smallest σ where J* reaches ``threshold``·Var, interpolated linearly in
    (ln σ, ln J*) between the grid points around the crossing (linearly in J* where J* = 0 at the
    lower one); the first σ where J* starts above the level; None where J* never reaches it."""
    level = threshold * variance
    above = np.nonzero(values >= level)[0]
    if above.size == 0:
        return None
    k = int(above[0])
    if k == 0:
        return float(sigmas[0])
    u0, u1 = np.log(sigmas[k - 1 : k + 1])
    j0, j1 = values[k - 1 : k + 1]
    if j0 > 0:
        j0, j1, level = np.log(j0), np.log(j1), np.log(level)
    return float(np.exp(u0 + (level - j0) / (j1 - j0) * (u1 - u0)))


def _interp_ln(sigma: Tensor, s: np.ndarray, v: np.ndarray, log_values: bool = False) -> Tensor:
    """v(σ) linear in ln σ between the table's points, end values held outside; with
    ``log_values``, ln v linear in ln σ (v a power law of σ) between points where v > 0 at
    both ends, v linear where either is 0."""
    u = torch.from_numpy(np.log(s))
    vals = torch.from_numpy(v)
    x = sigma.log().clamp(float(u[0]), float(u[-1]))
    i = torch.searchsorted(u, x.contiguous()).clamp(1, len(u) - 1)
    u0, u1 = u[i - 1], u[i]
    f = (x - u0) / (u1 - u0)
    v0, v1 = vals[i - 1], vals[i]
    linear = v0 + f * (v1 - v0)
    if not log_values:
        return linear
    both = (v0 > 0) & (v1 > 0)
    l0, l1 = v0.clamp_min(1e-300).log(), v1.clamp_min(1e-300).log()
    return torch.where(both, torch.exp(l0 + f * (l1 - l0)), linear)


def sample_piecewise_linear(
    u: Tensor, q: Tensor, n: int, generator: torch.Generator | None = None
) -> Tensor:
    """n draws of x from the density ∝ q, linear between the nodes u (increasing), by the exact
    inverse CDF: in the cell [u_i, u_i + h] with r the mass left, ∫_0^x (q_i + Δx/h) = r gives
    x = 2r / (q_i + √(q_i² + 2Δr/h)), Δ = q_{i+1} − q_i (stable also for Δ → 0)."""
    h = u[1:] - u[:-1]
    mass = 0.5 * h * (q[1:] + q[:-1])
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
    r_all = torch.rand(n, generator=generator, dtype=torch.float64) * cdf[-1]
    i = (torch.searchsorted(cdf, r_all, right=True) - 1).clamp(0, len(h) - 1)
    r = r_all - cdf[i]
    qi, dq, hi = q[i], q[i + 1] - q[i], h[i]
    root = (qi**2 + 2 * dq * r / hi).clamp_min(0).sqrt()
    x = torch.where(r > 0, 2 * r / (qi + root), torch.zeros_like(r))
    return u[i] + torch.minimum(x.nan_to_num(0.0), hi)


#: The columns of ``ScheduleTable.to_csv``: a grid column and its unit.
CSV_COLUMNS = {
    "sigma": "VE sigma",
    "log_sigma_density": "per unit ln sigma",
    "weight": "1 / (x0 units per element)",
    "optimal_loss": "x0 units per element",
    "gap": "x0 units per element",
}


@dataclass(frozen=True, kw_only=True)
class ScheduleTable(Result):
    """An optimal-loss schedule tabulated on its grid (``OptimalLossSchedule.tabulated``): σ,
    the density of ln σ, w, J*, g (None without a gap source) and the parameters, resolved
    ones included. A ``Result`` ("lossfloor-schedule"): ``save`` writes what ``lossfloor
    schedule --out`` writes, ``to_csv`` one row per grid point."""

    FORMAT: ClassVar[str] = "lossfloor-schedule"
    WHAT: ClassVar[str] = "an optimal-loss schedule"
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = CSV_COLUMNS
    OMIT: ClassVar[Mapping[str, Any]] = {"fit": None}

    sigma: list[float]
    log_sigma_density: list[float]
    weight: list[float]
    optimal_loss: list[float]
    gap: list[float] | None
    params: dict[str, Any]
    #: ``lossfloor schedule --fit``: the closest lognormal (``schedules.fit.fit_lognormal``).
    fit: dict[str, Any] | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One row per grid point (the gap empty without a gap source)."""
        gap: list[float | None] = [None] * len(self.sigma) if self.gap is None else [*self.gap]
        columns = (self.sigma, self.log_sigma_density, self.weight, self.optimal_loss, gap)
        return [
            dict(zip(CSV_COLUMNS, values, strict=True)) for values in zip(*columns, strict=True)
        ]

    def plot(self, ax: Axes | None = None) -> Axes:
        """w(σ), J*(σ) and the density of ln σ (twin axis) on ``ax`` (a new pyplot figure's
        without), σ* marked: ``plots.draw_schedule``. Returns the axes."""
        from lossfloor.plots import draw_schedule

        return draw_schedule(self.json_fields(), ax)

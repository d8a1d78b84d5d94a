"""A schedule's noise density in the knobs people already set, and draws any loop can use.

**The lognormal closest to a density** (``fit_lognormal``): for q(u) the density of u = ln σ,
the lognormal N(u; m, s²) that minimises KL(q‖N) has m = E_q[u], s² = Var_q[u] (KL(q‖N) =
−H(q) + ½ln(2πs²) + (Var_q + (E_q − m)²)/(2s²), minimised there), and then
KL = −H(q) + ½ln(2πe·s²). These are EDM's P_mean, P_std. They are also SD3's / rectified flow's
logit-normal (m, s) of t: with σ̃ = t/(1 − t), logit t = ln σ̃, so ln σ̃ ~ N(m, s²) is exactly
logit t ~ N(m, s²) — the same two numbers. Moments and the CDF are exact for the piecewise-linear
q of ``OptimalLossSchedule`` (its tabulated grid); any other schedule is tabulated on
``GRID`` + 1 nodes uniform in ln σ over its support. H(q) is the trapezoid rule on the grid
refined ``REFINE``×.

**Draws with weights** (``sample_with_weights``): σ ~ p and w(σ) in x0 units, so that
mean_i w_i·‖D(x0 + σ_i ε) − x0‖²/D is the schedule's loss. For a diffusers scheduler
(``sample_timesteps``): timestep k is drawn with the mass of q on its cell of ln σ̃ (between the
midpoints to its neighbours in ln σ̃; the end cells extend to the density's ends), and weighted
w(σ̃_k)/a²_k in the scheduler's prediction units (a²: the target's loss factor), so that
mean_i weight_i·‖pred − target‖²/D is the same loss on the scheduler's discrete σ̃.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lossfloor.diffusion.schedulers import scheduler_units
from lossfloor.errors import ParameterError

if TYPE_CHECKING:
    from lossfloor.schedules.base import NoiseSchedule

Tensor = torch.Tensor

#: Cells of the ln σ grid on which a schedule without a table of its own is tabulated.
GRID = 8192
#: Each cell split this many times for the entropy's trapezoid rule.
REFINE = 8


def density_table(schedule: NoiseSchedule) -> tuple[np.ndarray, np.ndarray]:
    """(u, q): nodes in ln σ and the density of ln σ at them, piecewise linear between them and
    normalised to integrate to 1: the optimal schedule's own table, else GRID + 1 nodes over the
    schedule's support."""
    u_own, q_own = getattr(schedule, "_u", None), getattr(schedule, "_q", None)
    if isinstance(u_own, Tensor) and isinstance(q_own, Tensor):
        u, q = u_own.numpy().copy(), q_own.numpy().copy()
    else:
        lo, hi = schedule.support()
        u = np.linspace(math.log(lo), math.log(hi), GRID + 1)
        q = schedule.density_ln_sigma(torch.from_numpy(np.exp(u))).numpy().astype(np.float64)
    mass = float(np.sum(0.5 * np.diff(u) * (q[1:] + q[:-1])))
    if not (mass > 0 and math.isfinite(mass)):
        raise ParameterError("schedule", schedule.name, "its density is zero or not finite")
    return u, q / mass


def _cell_moments(u: np.ndarray, q: np.ndarray, centre: float) -> tuple[float, float, float]:
    """∫q, ∫(u − c)q, ∫(u − c)²q exactly for q linear on each cell (c = ``centre``)."""
    v0, h = u[:-1] - centre, np.diff(u)
    q0, dq = q[:-1], np.diff(q)
    m0 = h * (q0 + dq / 2)
    m1 = h * (v0 * (q0 + dq / 2) + h * (q0 / 2 + dq / 3))
    m2 = h * (v0**2 * (q0 + dq / 2) + 2 * v0 * h * (q0 / 2 + dq / 3) + h**2 * (q0 / 3 + dq / 4))
    return float(m0.sum()), float(m1.sum()), float(m2.sum())


def _cdf(u: np.ndarray, q: np.ndarray, x: np.ndarray | float) -> np.ndarray:
    """∫_{u ≤ x} q at each x, exactly (q linear on each cell; 0 below u[0], 1 above u[-1])."""
    x = np.clip(np.asarray(x, dtype=np.float64), u[0], u[-1])
    mass = np.concatenate([[0.0], np.cumsum(0.5 * np.diff(u) * (q[1:] + q[:-1]))])
    i = np.clip(np.searchsorted(u, x, side="right") - 1, 0, len(u) - 2)
    h, r = u[i + 1] - u[i], x - u[i]
    return mass[i] + r * (q[i] + 0.5 * (q[i + 1] - q[i]) * r / h)


def _entropy(u: np.ndarray, q: np.ndarray) -> float:
    """−∫ q ln q (trapezoid on the grid refined REFINE×, q linear within each cell)."""
    f = np.linspace(0.0, 1.0, REFINE + 1)
    uu = (u[:-1, None] + np.diff(u)[:, None] * f[None, :]).reshape(-1)
    qq = (q[:-1, None] + np.diff(q)[:, None] * f[None, :]).reshape(-1)
    plogp = np.where(qq > 0, qq * np.log(np.where(qq > 0, qq, 1.0)), 0.0)
    return -float(np.sum(0.5 * np.diff(uu) * (plogp[1:] + plogp[:-1])))


@dataclass(frozen=True)
class LognormalFit:
    """The lognormal in σ closest to a schedule's density (module docstring): ``p_mean`` and
    ``p_std`` (EDM's knobs; SD3's logit-normal (m, s) of t are the same numbers), ``kl`` =
    KL(density‖lognormal) in nats, and at ``sigma_star`` the share of draws each puts below σ*
    and above 10·σ* (``below_star``, ``above_ten_star``: (density, lognormal))."""

    p_mean: float
    p_std: float
    kl: float
    sigma_star: float | None
    below_star: tuple[float, float] | None
    above_ten_star: tuple[float, float] | None

    def to_json(self) -> dict[str, Any]:
        """The ``fit`` block of ``lossfloor schedule --fit``."""
        out: dict[str, Any] = {
            "P_mean": self.p_mean,
            "P_std": self.p_std,
            "logit_normal": {"m": self.p_mean, "s": self.p_std},
            "kl": self.kl,
            "kl_units": "nats, KL(optimal density || lognormal)",
        }
        if self.sigma_star is not None:
            pair = ("optimal", "lognormal")
            out["sigma_star"] = self.sigma_star
            out["share_below_sigma_star"] = dict(zip(pair, self.below_star or (), strict=True))
            out["share_above_10_sigma_star"] = dict(
                zip(pair, self.above_ten_star or (), strict=True)
            )
        return out


def fit_lognormal(schedule: NoiseSchedule, sigma_star: float | None = None) -> LognormalFit:
    """The lognormal N(ln σ; P_mean, P_std²) closest in KL to the schedule's density; σ* for
    the shares: ``sigma_star``, else the optimal schedule's resolved σ* (``schedule.star``)."""
    u, q = density_table(schedule)
    c = float(np.sum(0.5 * np.diff(u) * (q[1:] * u[1:] + q[:-1] * u[:-1])))  # ≈ the mean
    m0, m1, m2 = _cell_moments(u, q, c)
    mean = c + m1 / m0
    var = m2 / m0 - (m1 / m0) ** 2
    std = math.sqrt(max(var, 0.0))
    kl = -_entropy(u, q) + 0.5 * math.log(2 * math.pi * math.e * var)
    star = sigma_star if sigma_star is not None else getattr(schedule, "star", None)
    below = above = None
    if star is not None:

        def normal_cdf(x: float) -> float:
            return 0.5 * math.erfc(-(x - mean) / (std * math.sqrt(2)))

        ls = math.log(star)
        ten = ls + math.log(10)
        below = (float(_cdf(u, q, ls)), normal_cdf(ls))
        above = (1 - float(_cdf(u, q, ten)), 1 - normal_cdf(ten))
    return LognormalFit(mean, std, max(kl, 0.0), star, below, above)


def sample_with_weights(
    schedule: NoiseSchedule, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(σ ~ p (n,), w(σ) in x0 units): the schedule's draws and loss weights (float64)."""
    sigma = schedule.sample(n, generator)
    return sigma, schedule.weight(sigma)


def timestep_probabilities(schedule: NoiseSchedule, scheduler: Any) -> Tensor:
    """P(k) for each timestep k of the scheduler: the density's mass on k's cell of ln σ̃."""
    process, _ = scheduler_units(scheduler, "sample_timesteps")
    u, q = density_table(schedule)
    ls = process.sigma_ve(torch.arange(int(process.t_max) + 1, dtype=torch.float64)).log()
    edges = 0.5 * (ls[1:] + ls[:-1]).numpy()
    cdf = np.concatenate([[0.0], _cdf(u, q, edges), [1.0]])
    p = torch.from_numpy(np.clip(np.diff(cdf), 0.0, None))
    return p / p.sum()


def sample_timesteps(
    schedule: NoiseSchedule, n: int, scheduler: Any, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(n timesteps drawn with ``timestep_probabilities`` (int64), their weights
    w(σ̃_k)/a²_k in the scheduler's prediction units (float64))."""
    process, target = scheduler_units(scheduler, "sample_timesteps")
    p = timestep_probabilities(schedule, scheduler)
    t = torch.arange(len(p), dtype=torch.float64)
    table = schedule.weight(process.sigma_ve(t)) / target.loss_factor(t, process)
    k = torch.multinomial(p, n, replacement=True, generator=generator)
    return k, table[k]

"""The training schedule derived from the optimal loss (docs/method.md §5), in VE σ and x0 units.

  w(σ) = a·min(1/J*(σ), w_max) + b·a·w_max·exp(−(ln σ − μ)²/(2s²))·1[σ < σ*]
  q(ln σ) ∝ (w(σ)·g(σ))^γ on [σ_min, σ_max]   (density="gap"; g ≡ 1 without a gap source)
  q(ln σ) ∝ N(ln σ; P_mean, P_std²) on [σ_min, σ_max]   (density="lognormal": only w changes)

J*(σ) is a tabulated optimal-loss curve (``Curve``), here a power law between its points: ln J*
linear in ln σ where J* > 0 at both ends (J* linear where one is 0), since J* spans decades
between points where it leaves its memorisation floor (a linear J* there makes w = 1/J* fall by
the whole ratio just past the lower point); ``coarse`` lists the steps where J* changes by more
than COARSE_RATIO above the cap, ``coarse_warning`` says so in one line. The bump is the
paper's 𝒩(ln σ; μ, s²) term written with its peak height b relative to the cap a·w_max, so b is
scale-free. Defaults and rules (justified in docs/experiments/schedule.md):

* σ* = the smallest σ with J*(σ) ≥ τ·Var (τ = ``star_threshold`` = 0.01, Var the data variance,
  or the curve's last value when the curve has none): where J* leaves its memorisation floor.
* w_max = 1/J*(σ*): the cap starts where J* leaves the floor, so the first term is continuous.
* a = 1: above σ* each noise level's weighted floor a·w·J* is 1, the loss reads as J_θ/J*.
* b = 0 (the bump is off unless asked for), μ = ln σ* − 1, s = 0.5.
* γ = 1 (the paper's p ∝ w·gap); [σ_min, σ_max] = [0.002, 80], EDM's sampling range.
* The gap g(σ) ≥ ``gap_floor``·max g (0.02), so p never vanishes where the gap is near zero.

Coverage: the curve must reach σ_max. Below its first point J* is nondecreasing in σ (the MMSE
of a noisier observation is larger), so J*(σ) ≤ J*(σ_0) and min(1/J*, w_max) = w_max exactly
when the cap binds at σ_0; a curve starting higher is refused. ``weight`` at σ outside the
support holds J*'s end values (it is never drawn there).

q is tabulated on ``grid`` cells uniform in ln σ and is piecewise linear in ln σ, so its CDF is
piecewise quadratic and ``sample`` inverts it exactly (one square root per draw).

**Gap sources.** ``gap`` is None (p from w alone), a table {"sigma", "value"} (a ``diagnose``
result, linear in ln σ; it must cover [σ_min, σ_max]: ``gap_range`` moves the default ends
inside it) or "online": per ln σ bin (``bins``
uniform over the support) the exponentially decayed sums S_k ← d·S_k + Σ(ℓ_i − J*(σ_i)),
C_k ← d·C_k + n_k of the training x0 losses ℓ_i handed to ``observe`` (by the trainer's
``training.loss.OnlineGap`` hook), with
d = 2^(−n/h) per batch of n images (h = ``halflife`` images); ĝ_k = S_k/C_k at the bin centres,
linear in ln σ between them, bins never visited take the largest observed ĝ (they get explored),
and before any observation g ≡ 1. S and C are the state (``state_dict``), so resume is exact.

Processes and targets: the trainer's loss is w(σ)·‖D − x0‖² in x0 units with σ the VE level
σ̃ = σ_t/α_t, so any model (EDM, VP, flow matching: the Denoiser maps σ̃ to its t(σ̃)) trains on
exactly this w and p; in a target's own units the weight is w/loss_factor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lossfloor.diffusion.processes import Process
from lossfloor.diffusion.targets import Target
from lossfloor.errors import ParameterError, UserError
from lossfloor.schedules.base import SCHEDULES, NoiseSchedule, _f64
from lossfloor.schedules.bins import bin_index, decay, decayed_add, log_edges
from lossfloor.schedules.tabulated import (
    STAR_THRESHOLD,
    ScheduleTable,
    _interp_ln,
    _table,
    sample_piecewise_linear,
    sigma_star,
)
from lossfloor.sigmas import SIGMA_RTOL

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Tensor = torch.Tensor

DENSITIES = ("gap", "lognormal")

#: ``OptimalLossSchedule.coarse``: neighbouring curve points whose J* differ by more than this
#: factor where w depends on J* (above the cap) make w and p there the interpolation's shape.
COARSE_RATIO = 10.0


def gap_range(
    gap_sigmas: list[float], sigma_min: float | None = None, sigma_max: float | None = None
) -> tuple[float, float]:
    """The σ range [σ_min, σ_max] a schedule with a gap table (at ``gap_sigmas``) draws: an end
    given is kept (the schedule then refuses a gap that does not cover it); an end not given
    is the default's (OptimalLossSchedule: 0.002, 80) moved inside the gap's σ range where the
    gap does not reach it (within SIGMA_RTOL, the relative tolerance of the coverage check), so the
    density never extrapolates the gap."""
    lo = OptimalLossSchedule.sigma_min if sigma_min is None else sigma_min
    hi = OptimalLossSchedule.sigma_max if sigma_max is None else sigma_max
    if not gap_sigmas:
        return lo, hi
    if sigma_min is None and min(gap_sigmas) > lo * (1 + SIGMA_RTOL):
        lo = min(gap_sigmas)
    if sigma_max is None and max(gap_sigmas) < hi * (1 - SIGMA_RTOL):
        hi = max(gap_sigmas)
    return lo, hi


@SCHEDULES.register("optimal", "optimal-loss")
@dataclass
class OptimalLossSchedule(NoiseSchedule):
    """w(σ) and p(σ) from an optimal-loss curve J*(σ) and a gap source (module docstring).

    ``optimal_loss`` = {"sigma": [...], "value": [...]} (the curve's points, embedded so that a
    run directory is self-contained; ``from_curve`` fills it and ``dataset``/``data_variance``).
    """

    optimal_loss: dict[str, list[float]]
    data_variance: float | None = None
    dataset: dict[str, Any] | None = None
    gap: str | dict[str, list[float]] | None = None
    a: float = 1.0
    w_max: float | None = None
    sigma_star: float | None = None
    star_threshold: float = STAR_THRESHOLD
    bump: float = 0.0
    bump_mean: float | None = None
    bump_std: float = 0.5
    density: str = "gap"
    p_mean: float = -1.2
    p_std: float = 1.2
    exponent: float = 1.0
    gap_floor: float = 0.02
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    grid: int = 2048
    bins: int = 32
    halflife: float = 2000.0
    name = "optimal"

    # ----- construction --------------------------------------------------------------------
    @classmethod
    def from_curve(cls, curve: Any, gap: Any = None, **params: Any) -> OptimalLossSchedule:
        """From a ``Curve`` (its ``sigmas``, ``values``, ``data_variance``, ``dataset``) and a
        gap source: None, "online" or a table {"sigma", "value"} (a ``Diagnosis``:
        ``diagnosis.gap_table(curve.dataset)``, which checks it is of the curve's data)."""
        table = {"sigma": curve.sigmas.tolist(), "value": curve.values.tolist()}
        return cls(
            optimal_loss=table,
            data_variance=curve.data_variance,
            dataset=curve.dataset,
            gap=gap,
            **params,
        )

    def __post_init__(self) -> None:
        positive = ("a", "star_threshold", "bump_std", "p_std", "exponent", "halflife")
        for param in positive:
            value = getattr(self, param)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ParameterError(param, value, "must be a positive number")
        for param in ("w_max", "sigma_star", "data_variance"):
            value = getattr(self, param)
            if value is not None and not 0 < value < math.inf:
                raise ParameterError(param, value, "must be a positive number")
        if not 0 <= self.bump < math.inf:
            raise ParameterError("bump", self.bump, "must be >= 0 (0: no bump)")
        if not 0 <= self.gap_floor <= 1:
            raise ParameterError("gap_floor", self.gap_floor, "must be in [0, 1]")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ParameterError("sigma_min", self.sigma_min, "need 0 < sigma_min < sigma_max")
        if not (isinstance(self.grid, int) and self.grid >= 16):
            raise ParameterError("grid", self.grid, "must be an integer >= 16 cells")
        if not (isinstance(self.bins, int) and self.bins >= 2):
            raise ParameterError("bins", self.bins, "must be an integer >= 2")
        if self.density not in DENSITIES:
            raise ParameterError("density", self.density, f"must be one of {DENSITIES}")
        if self.density == "lognormal" and self.gap is not None:
            raise ParameterError("gap", self.gap, "the lognormal density uses no gap")
        self._s, self._j = _table(self.optimal_loss, "optimal_loss")
        if np.any(self._j < -1e-6 * max(float(self._j.max()), 0.0)):
            raise ParameterError("optimal_loss", "…", "J* values must be >= 0")
        self._j = np.maximum(self._j, 0.0)  # rounding (−1e-16) of a J* that is 0
        self._resolve()
        self._check_coverage()
        self._u = torch.linspace(
            math.log(self.sigma_min), math.log(self.sigma_max), self.grid + 1, dtype=torch.float64
        )
        self._gap_table: tuple[np.ndarray, np.ndarray] | None = None
        self._gap_top = 0.0
        if isinstance(self.gap, Mapping):
            self._gap_table = _table(self.gap, "gap")
            lo, hi = self._gap_table[0][[0, -1]]
            if self.sigma_min < lo * (1 - SIGMA_RTOL) or self.sigma_max > hi * (1 + SIGMA_RTOL):
                raise ParameterError(
                    "gap", f"σ {lo:g}..{hi:g}", f"the gap must cover the training range "
                    f"[{self.sigma_min:g}, {self.sigma_max:g}]: diagnose over it, or narrow the "
                    "σ range drawn (sigma_min, sigma_max)",
                )  # fmt: skip
        elif self.gap not in (None, "online"):
            raise ParameterError("gap", self.gap, 'must be None, "online" or a gap table')
        self._bin_edges = log_edges(self.sigma_min, self.sigma_max, self.bins)
        self._sum = torch.zeros(self.bins, dtype=torch.float64)
        self._count = torch.zeros(self.bins, dtype=torch.float64)
        self._tabulate()

    def _resolve(self) -> None:
        """σ* (the rule or given), w_max (1/J*(σ*) or given), the bump's μ."""
        var = self.data_variance if self.data_variance is not None else float(self._j[-1])
        self.variance = var
        if self.sigma_star is None:  # where J* (``_optimal``) crosses τ·Var
            found = sigma_star(self._s, self._j, var, self.star_threshold)
            if found is None:
                raise ParameterError(
                    "star_threshold", self.star_threshold, "J* never reaches this share of Var"
                )
            star = found
        else:
            star = float(self.sigma_star)
        self.star = star
        j_star = float(self._optimal(_f64(star)))
        if self.w_max is None and j_star <= 0:
            raise ParameterError("sigma_star", star, "J*(σ*) = 0; give w_max")
        self.cap = float(self.w_max) if self.w_max is not None else 1.0 / j_star
        self.mu = math.log(star) - 1.0 if self.bump_mean is None else float(self.bump_mean)

    def _check_coverage(self) -> None:
        """The curve must reach σ_max, and below its first point the cap must bind."""
        lo, hi = float(self._s[0]), float(self._s[-1])
        if self.sigma_max > hi * (1 + SIGMA_RTOL):
            raise ParameterError(
                "sigma_max", self.sigma_max, f"the optimal-loss curve ends at σ = {hi:g}; "
                "estimate it up to the training range's top or lower sigma_max",
            )  # fmt: skip
        if self.sigma_min < lo * (1 - SIGMA_RTOL) and not self._j[0] * self.cap <= 1:
            raise ParameterError(
                "sigma_min", self.sigma_min, f"the optimal-loss curve starts at σ = {lo:g}, "
                "where the cap w_max does not yet bind; estimate it down to sigma_min",
            )  # fmt: skip

    def coarse(self) -> list[tuple[float, float, float]]:
        """(σ_i, σ_{i+1}, J* ratio) for each pair of neighbouring curve points, in or around
        the support, where w depends on J* (J*·w_max > 1 at an end: the cap does not
        bind at both ends) and J* changes by more than COARSE_RATIO (∞ where one end is 0):
        there J* spans a decade within one step, so w = a/J* and p follow the interpolation
        (ln J* linear in ln σ), not the data. A grid with ≥ 1 point per such decade is fine."""
        out = []
        for k in range(len(self._s) - 1):
            (s0, s1), (j0, j1) = self._s[k : k + 2], self._j[k : k + 2]
            if s1 <= self.sigma_min or s0 >= self.sigma_max or max(j0, j1) * self.cap <= 1:
                continue
            ratio = max(j0, j1) / min(j0, j1) if min(j0, j1) > 0 else math.inf
            if ratio > COARSE_RATIO:
                out.append((float(s0), float(s1), float(ratio)))
        return out

    def coarse_warning(self) -> str | None:
        """A one-line message about ``coarse`` steps (None if there are none)."""
        steps = self.coarse()
        if not steps:
            return None
        listed = ", ".join(f"{a:.3g}→{b:.3g} (×{r:.3g})" for a, b, r in steps)
        return (
            f"the J* curve is too coarse for a schedule: J* changes by more than "
            f"{COARSE_RATIO:g}× between neighbouring points at σ = {listed}, where w = a/J*; "
            "estimate J* on a finer σ grid there"
        )

    # ----- functions of σ --------------------------------------------------------------------
    def _optimal(self, sigma: Tensor) -> Tensor:
        return _interp_ln(sigma, self._s, self._j, log_values=True)

    def optimal_loss_at(self, sigma: float | Tensor) -> Tensor:
        """J*(σ) of the embedded curve (ln J* linear in ln σ where J* > 0 at both points,
        else J* linear; end values held)."""
        return self._optimal(_f64(sigma))

    def weight(self, sigma: float | Tensor) -> Tensor:
        s = _f64(sigma)
        j = self._optimal(s)
        first = self.a * torch.where(j * self.cap > 1, 1.0 / j.clamp_min(1e-300), self.cap)
        if self.bump == 0:
            return first
        z = (s.log() - self.mu) / self.bump_std
        bump = self.bump * self.a * self.cap * torch.exp(-0.5 * z**2) * (s < self.star)
        return first + bump

    def _raw_gap(self, s: Tensor) -> Tensor | None:
        """g(σ) before the floor; None without a gap source."""
        if self._gap_table is not None:
            return _interp_ln(s, *self._gap_table)
        return self._online_gap(s) if self.online else None

    def gap_at(self, sigma: float | Tensor) -> Tensor | None:
        """g(σ) as the density uses it: ≥ gap_floor × its maximum over the support (≡ 1 when
        that maximum is ≤ 0); None without a gap source."""
        s = _f64(sigma)
        g = self._raw_gap(s)
        if g is None:
            return None
        if self._gap_top <= 0:
            return torch.ones_like(s)
        return g.clamp_min(self.gap_floor * self._gap_top)

    def _online_gap(self, s: Tensor) -> Tensor:
        seen = self._count > 0
        if not bool(seen.any()):
            return torch.ones_like(s)
        est = torch.where(seen, self._sum / self._count.clamp_min(1e-300), torch.nan)
        est = torch.where(seen, est, est[seen].max())
        centres = 0.5 * (self._bin_edges[1:] + self._bin_edges[:-1])
        return _interp_ln(s, centres.exp().numpy(), est.numpy())

    def _tabulate(self) -> None:
        """q on the ln σ nodes, normalised to integrate to 1 (trapezoid = exact integral of the
        piecewise-linear q)."""
        s = self._u.exp()
        if self.density == "lognormal":
            q = torch.exp(-0.5 * ((self._u - self.p_mean) / self.p_std) ** 2)
        else:
            raw = self._raw_gap(s)
            self._gap_top = 0.0 if raw is None else float(raw.max())
            g = self.gap_at(s)
            q = (self.weight(s) * (1.0 if g is None else g)) ** self.exponent
        h = self._u[1] - self._u[0]
        mass = float(h * (q.sum() - 0.5 * (q[0] + q[-1])))
        if not (mass > 0 and math.isfinite(mass)):
            raise UserError("the schedule's density is zero or not finite on its σ range")
        self._q = q / mass

    def density_ln_sigma(self, sigma: float | Tensor) -> Tensor:
        s = _f64(sigma)
        u = s.log()
        inside = (u >= self._u[0]) & (u <= self._u[-1])
        x = u.clamp(float(self._u[0]), float(self._u[-1]))
        q = torch.as_tensor(np.interp(x.numpy(), self._u.numpy(), self._q.numpy()))
        return torch.where(inside, q, torch.zeros_like(q))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return sample_piecewise_linear(self._u, self._q, n, generator).exp()

    def support(self) -> tuple[float, float]:
        return (self.sigma_min, self.sigma_max)

    def tabulated(self) -> ScheduleTable:
        """The grid and the functions on it (``lossfloor schedule --out``): σ, the density of
        ln σ, w, J*, g (None without a gap source) and the parameters, resolved ones included."""
        s = self._u.exp()
        g = self.gap_at(s)
        return ScheduleTable(
            sigma=s.tolist(),
            log_sigma_density=self._q.tolist(),
            weight=self.weight(s).tolist(),
            optimal_loss=self.optimal_loss_at(s).tolist(),
            gap=None if g is None else g.tolist(),
            params=self.params(),
        )

    def plot(self, ax: Axes | None = None) -> Axes:
        """``tabulated().plot(ax)``: w(σ), J*(σ) and the density of ln σ. Returns the axes."""
        return self.tabulated().plot(ax)

    def params(self) -> dict[str, Any]:
        """The parameters without the embedded tables, with σ*, w_max and μ as used."""
        config = self.to_config()
        for key in ("optimal_loss", "gap"):
            config.pop(key)
        gap = self.gap if isinstance(self.gap, str | None) else "table"
        return {**config, "gap": gap, "resolved": {
            "sigma_star": self.star, "w_max": self.cap, "bump_mean": self.mu,
            "data_variance": self.variance}}  # fmt: skip

    # ----- consistency and online state -----------------------------------------------------
    def check(self, process: Process, target: Target, sigma_data: float) -> None:
        """The support must lie in the model process's σ̃ range."""
        lo = float(process.sigma_ve(_f64(process.t_min)))
        hi = float(process.sigma_ve(_f64(process.t_max)))
        if self.sigma_min < lo * (1 - SIGMA_RTOL) or self.sigma_max > hi * (1 + SIGMA_RTOL):
            raise UserError(
                f"schedule optimal draws σ in [{self.sigma_min:g}, {self.sigma_max:g}] but the "
                f"model's process covers [{lo:g}, {hi:g}]; set sigma_min/sigma_max inside it"
            )

    @property
    def online(self) -> bool:
        return self.gap == "online"

    def observe(self, sigma: Tensor, loss_x0: Tensor) -> None:
        """Add a batch of training x0 losses at the σ drawn to the online gap (no-op unless
        gap="online"), then re-tabulate the density."""
        if not self.online:
            return
        s = _f64(sigma).detach().cpu()
        diff = loss_x0.detach().double().cpu() - self._optimal(s)
        k, d = bin_index(s.log(), self._bin_edges), decay(len(s), self.halflife)
        self._sum = decayed_add(self._sum, k, diff, d)
        self._count = decayed_add(self._count, k, torch.ones_like(diff), d)
        self._tabulate()

    def state_dict(self) -> dict[str, Any]:
        """The online gap's decayed sums (empty unless gap="online")."""
        return {"sum": self._sum.clone(), "count": self._count.clone()} if self.online else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.online:
            if state:
                raise UserError("this schedule has no online state, but the checkpoint has one")
            return
        if set(state) != {"sum", "count"} or len(state["sum"]) != self.bins:
            raise UserError("the checkpoint's online gap state does not fit this schedule")
        self._sum = torch.as_tensor(state["sum"], dtype=torch.float64).clone()
        self._count = torch.as_tensor(state["count"], dtype=torch.float64).clone()
        self._tabulate()

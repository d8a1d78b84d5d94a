"""An optimal-loss curve J*(σ): per-σ values with standard errors, interpolation in log σ,
totals under a training objective, and the JSON contract other commands read."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from lossfloor.errors import UserError
from lossfloor.results import Result
from lossfloor.schedules import NoiseSchedule
from lossfloor.sigmas import SIGMA_RTOL, same_sigma

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: Sub-intervals per grid interval for the refined quadrature that estimates the trapezoid error.
REFINE = 16

#: The columns of ``Curve.to_csv``: a CurvePoint field and its unit.
CSV_COLUMNS = {
    "sigma": "VE sigma",
    "t": "process time",
    "optimal_loss": "x0 units per element",
    "stderr": "x0 units per element",
    "optimal_loss_target": "target units per element",
    "seconds": "s",
    "closed": "x0 units per element",
    "closed_stderr": "x0 units per element",
    "direct": "x0 units per element",
    "direct_stderr": "x0 units per element",
    "combined_weight_closed": "dimensionless",
    "closed_rounding": "x0 units per element",
    "dtype": "",
    "ess": "draws",
    "resolved": "",
    "upper_bound": "x0 units per element",
    "memorised": "",
    "heldout_loss": "x0 units per element",
    "heldout_stderr": "x0 units per element",
    "smoothed_loss": "x0 units per element",
    "smoothed_stderr": "x0 units per element",
    "bandwidth": "x0 units",
    "outer": "draws",
    "inner": "points",
    "rse": "dimensionless",
}

#: The estimator block of a curve's JSON holds the estimator's config and these draw parameters
#: ("draws" only where set: files written before it existed used plain draws; "target_rse" and
#: "pilot" only for adaptive sizes).
DRAW_KEYS = ("outer", "seed", "draws", "form", "target_rse", "pilot")

#: The draw parameters written only where set.
OPTIONAL_DRAW_KEYS = ("draws", "target_rse", "pilot")

#: Point fields written only where set (files written before they existed, and points without
#: held-out sources, do not have them).
OPTIONAL_POINT_KEYS = (
    "closed_rounding", "ess", "resolved", "upper_bound", "memorised", "heldout_loss",
    "heldout_stderr", "smoothed_loss", "smoothed_stderr", "bandwidth", "outer", "inner", "rse",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CurvePoint:
    """J*(σ) at one σ (per element, x0 units): the reported value and its standard error, both
    forms of the outer average (closed A − ‖μ‖², direct ‖x0 − μ‖²) with theirs, the weight
    a ∈ [0, 1] of the closed form in the combination a·closed + (1−a)·direct, the process time
    t, the value in the target's units (J*·loss factor, None without a target), the dtype and
    the seconds. ``optimal_loss`` = max(0, the reported form's mean): never negative (a mean
    below 0 is noise around a J* near 0; the unclipped mean is a·closed + (1−a)·direct).
    ``closed`` is an unbiased mean of per-draw values that may be negative where J* is near 0
    (likewise ``direct`` on tilted draws, after the control variate); on tilted draws
    ``closed_rounding`` bounds its float rounding (``precision.closed_rounding``; None where that
    bound is not finite), and a = 0 where
    that bound exceeds a tenth of its standard error and the two forms disagree
    (``moments.Moments.from_samples``): then the closed form is not in the value.
    ``ess``, the effective number of draws that carry the value ((Σv)²/Σv² of the direct
    form's per-draw values), and ``resolved``: whether it is large enough for the standard
    error to mean something (never with ESS 0). ``upper_bound``: a rigorous bound J* ≤ it (the
    nearest-point denoiser's error, ``optimal.bound``; only where below the data variance),
    and ``memorised``: whether that bound is at most ``bound.MEMORISED_SHARE`` of the data
    variance (J* ≈ 0: the optimum recalls its source; the bound, not the estimate, answers how
    small J* is there). With held-out sources (``lossfloor.floor.with_heldout``)
    the held-out losses of the optimal denoiser and of its smoothed version at ``bandwidth``
    (upper bounds on the population's J*); with adaptive sizes (``target_rse``), the draws
    ``outer`` and (stratified) far sample ``inner`` this σ used and the achieved relative
    standard error ``rse`` = stderr/J*. The fields are the JSON's keys, in order; those of
    OPTIONAL_POINT_KEYS are left out where None."""

    sigma: float
    t: float | None = None
    optimal_loss: float
    stderr: float = 0.0
    optimal_loss_target: float | None = None
    seconds: float | None = None
    closed: float | None = None
    closed_stderr: float | None = None
    direct: float | None = None
    direct_stderr: float | None = None
    combined_weight_closed: float | None = None
    closed_rounding: float | None = None
    dtype: str | None = None
    ess: float | None = None
    resolved: bool | None = None
    upper_bound: float | None = None
    memorised: bool | None = None
    heldout_loss: float | None = None
    heldout_stderr: float | None = None
    smoothed_loss: float | None = None
    smoothed_stderr: float | None = None
    bandwidth: float | None = None
    outer: int | None = None
    inner: int | None = None
    rse: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None or k not in OPTIONAL_POINT_KEYS}

    @classmethod
    def from_json(cls, obj: Any) -> CurvePoint:
        """A point as ``to_json`` writes it; only sigma and optimal_loss are required."""
        if not isinstance(obj, dict) or not {"sigma", "optimal_loss"} <= set(obj):
            raise UserError("not an optimal-loss curve: expected points with sigma, optimal_loss")
        unknown = sorted(set(obj) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"not an optimal-loss curve: unknown point field {unknown[0]!r}")
        return cls(**obj)


@dataclass(frozen=True)
class Total:
    """The total optimal loss E_{σ~p}[w(σ)·J*(σ)] of a training objective (``Total.compute``)."""

    schedule: dict[str, Any]
    optimal_loss: float
    stderr: float
    quadrature_error: float
    tail: float
    grid: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "grid": list(self.grid)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Total:
        try:
            return cls(**{**obj, "grid": tuple(obj["grid"])})
        except (KeyError, TypeError):
            raise UserError(f"not a total optimal loss: {obj!r}") from None

    @classmethod
    def compute(
        cls, sigmas: np.ndarray, values: np.ndarray, stderrs: np.ndarray, schedule: NoiseSchedule
    ) -> Total:
        """E_{σ~p}[w(σ)·J*(σ)] = ∫ q(ln σ)·w(σ)·J*(σ) d ln σ over the grid (sorted σ).

        q·w is exact; J* is interpolated linearly in ln σ between grid points and the integral
        taken by the trapezoid rule on a grid REFINE× finer. Reported errors:
        ``quadrature_error`` = the difference to a monotone cubic (PCHIP) interpolation of J*;
        ``tail`` = the mass of p outside the grid times the end values of w·J* (added to the
        value, an estimate of what the grid misses); ``stderr`` = Σ_i c_i·se_i with c_i the
        integral's weight of point i (the draws are shared across σ, so per-σ errors are
        positively correlated and this sum bounds the error).
        """
        import torch
        from scipy.interpolate import PchipInterpolator

        if sigmas.size < 2:
            raise UserError("a total over a schedule needs at least 2 σ values on the grid")
        u = np.log(sigmas)
        fine_u = np.concatenate(
            [np.linspace(u[i], u[i + 1], REFINE, endpoint=False) for i in range(u.size - 1)]
            + [u[-1:]]
        )
        s = torch.from_numpy(np.exp(fine_u))
        qw = (schedule.density_ln_sigma(s) * schedule.weight(s)).numpy()
        weights = np.array(
            [
                np.trapezoid(qw * np.interp(fine_u, u, np.eye(u.size)[i]), fine_u)
                for i in range(u.size)
            ]
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
        return cls(
            schedule=schedule.to_config(),
            optimal_loss=value + tail,
            stderr=float(weights @ stderrs),
            quadrature_error=abs(cubic - value),
            tail=tail,
            grid=(float(sigmas[0]), float(sigmas[-1])),
        )


@dataclass(frozen=True, kw_only=True)
class Curve(Result):
    """J*(σ) per element in VE σ and x0 units: the points, what produced them and the total.

    ``estimator`` is the estimator's ``to_config()`` (``ESTIMATORS.from_config`` rebuilds it);
    ``outer``, ``seed`` and ``draws`` (tilted or plain; None: plain, written before it existed)
    fix the draws (with ``target_rse``, each σ uses the first of those ``outer`` draws that
    give that relative standard error, from a ``pilot`` of the first draws: its point's
    ``outer``), ``form`` the reported form. ``dataset``, ``sources`` (the held-out data of
    the outer draws, if any), ``process`` and ``target`` describe the data and the units of
    ``t`` and ``optimal_loss_target`` where known. A ``Result`` ("lossfloor-curve"): the file
    (``to_json``, ``save``) is what ``lossfloor estimate --out`` writes, with the draw
    parameters inside the estimator block; ``from_json`` / ``load`` read it back; ``to_csv``
    writes the points (``estimate --csv``).
    """

    FORMAT: ClassVar[str] = "lossfloor-curve"
    WHAT: ClassVar[str] = "an optimal-loss curve"
    OMIT: ClassVar[Mapping[str, Any]] = dict.fromkeys(
        ("dataset", "sources", "process", "target", "estimator")
    )
    DECODE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "points": lambda ps: tuple(CurvePoint.from_json(p) for p in ps),
        "total": lambda t: None if t is None else Total.from_json(t),
    }
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = CSV_COLUMNS

    dataset: dict[str, Any] | None = None
    sources: dict[str, Any] | None = None
    process: dict[str, Any] | None = None
    target: dict[str, Any] | None = None
    estimator: dict[str, Any] | None = None
    outer: int | None = None
    seed: int | None = None
    draws: str | None = None
    form: str | None = None
    target_rse: float | None = None
    pilot: int | None = None
    per_element: bool = True
    data_variance: float | None = None
    precision: str | None = None
    points: tuple[CurvePoint, ...]
    total: Total | None = None

    def __post_init__(self) -> None:
        if not self.points:
            raise UserError("the optimal-loss curve has no points")

    # --- derived views ---------------------------------------------------------------------

    @cached_property
    def _by_sigma(self) -> tuple[CurvePoint, ...]:
        return tuple(sorted(self.points, key=lambda p: p.sigma))

    @cached_property
    def sigmas(self) -> np.ndarray:
        """The grid, increasing."""
        return np.array([p.sigma for p in self._by_sigma], dtype=np.float64)

    @cached_property
    def values(self) -> np.ndarray:
        """J*(σ) on ``sigmas``."""
        return np.array([p.optimal_loss for p in self._by_sigma], dtype=np.float64)

    @cached_property
    def stderrs(self) -> np.ndarray:
        """The standard errors of ``values``."""
        return np.array([p.stderr for p in self._by_sigma], dtype=np.float64)

    @property
    def total_optimal_loss(self) -> float:
        """E_{σ~p}[w(σ)·J*(σ)] under the schedule the curve was estimated with."""
        if self.total is None:
            raise UserError(
                "this curve has no total: estimate it with a schedule, or use total_under()"
            )
        return self.total.optimal_loss

    def __call__(self, sigma: float | np.ndarray) -> np.ndarray:
        """J*(σ) by linear interpolation in ln σ; σ outside the grid is an error."""
        s = np.asarray(sigma, dtype=np.float64)
        lo, hi = self.sigmas[0], self.sigmas[-1]
        if np.any(s < lo * (1 - SIGMA_RTOL)) or np.any(s > hi * (1 + SIGMA_RTOL)):
            raise UserError(
                f"σ outside the optimal-loss curve's grid [{lo:g}, {hi:g}]; recompute it wider"
            )
        return np.interp(np.log(s), np.log(self.sigmas), self.values)

    def point_at(self, sigma: float) -> CurvePoint | None:
        """The point at ``sigma`` (``same_sigma``: the tolerance a resumed estimate uses)."""
        return next((p for p in self.points if same_sigma(p.sigma, sigma)), None)

    def total_under(self, schedule: NoiseSchedule) -> Total:
        """The total E_{σ~p}[w(σ)·J*(σ)] under ``schedule`` (``Total.compute``)."""
        return Total.compute(self.sigmas, self.values, self.stderrs, schedule)

    # --- JSON ------------------------------------------------------------------------------

    def json_fields(self) -> dict[str, Any]:
        """The body: dataset, sources, process, target (where known), the estimator block
        (config + outer, seed, form and the DRAW_KEYS that are set), per_element,
        data_variance, precision, points, total."""
        out = {k: v for k, v in super().json_fields().items() if k not in DRAW_KEYS}
        if self.estimator is not None:
            draws = {k: getattr(self, k) for k in DRAW_KEYS}
            for key in OPTIONAL_DRAW_KEYS:
                if draws[key] is None:
                    del draws[key]
            out["estimator"] = {**self.estimator, **draws}
        return out

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Self:
        """Read what ``json_fields`` writes (every file ``lossfloor estimate`` has written);
        only ``points`` with sigma and optimal_loss are required."""
        if not isinstance(body.get("points"), list):
            raise UserError("not an optimal-loss curve: expected points with sigma, optimal_loss")
        block = body.get("estimator") or {}
        if not isinstance(block, dict):
            raise UserError(f"not an optimal-loss curve: the estimator block is {block!r}")
        config = {k: v for k, v in block.items() if k not in DRAW_KEYS}
        draws = {k: block.get(k) for k in DRAW_KEYS}
        return super().from_fields({**body, "estimator": config or None, **draws})

    def plot(self, ax: Axes | None = None, title: str = "") -> Axes:
        """J*(σ) ± 2 s.e. on ``ax`` (log axes; a new pyplot figure's without), labelled by the
        estimator, the data variance dashed: ``plots.draw_optimal_loss``. Returns the axes."""
        from lossfloor.plots import draw_optimal_loss

        label = self.estimator["name"] if self.estimator else "J*(σ)"
        return draw_optimal_loss([(label, self)], ax, data_variance=self.data_variance, title=title)

"""Scaling laws of the loss minus the optimal loss (docs/method.md §6).

For each σ (and for the total loss) the rows (F_i, J_i) of many runs and checkpoints are fitted
three ways, side by side:

  raw          J = β·F^α               ln J = ln β + α·ln F, least squares in log–log
  subtracted   J − J* = β·F^α          the same on ln(J − J*), J* from an optimal-loss Curve
  offset       J = β·F^α + c           c free, nonlinear least squares on relative residuals
                                       (J − Ĵ)/J, with parameter standard errors from the
                                       Jacobian (``scipy.optimize.curve_fit``)

Reported per log–log fit: α, β, ρ = Pearson correlation of (ln F, ln y), R² of the fitted J in
linear units (1 − Σ(J − Ĵ)²/Σ(J − J̄)², so raw and subtracted are scored on the same J) and the
residuals ln y − (ln β + α ln F). Rows with J ≤ J* have no logarithm after subtraction: they are
counted (``dropped_rows``) and listed, never silently dropped.

``read_runs`` reads RUNS.csv (``run,params,flops,images_seen,sigma,loss``; sigma empty for the
total loss; other columns are kept but unused); ``fit_scaling`` fits it against a ``Curve``.
This module is the pure fit (numpy, scipy; nothing above ``lossfloor.optimal``);
``lossfloor.scaling.collection.collect`` measures the rows from training runs.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from lossfloor.errors import ParameterError, UserError
from lossfloor.io import atomic_path
from lossfloor.results import Result
from lossfloor.sigmas import SIGMA_RTOL, same_sigma

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from lossfloor.optimal import Curve

#: The columns RUNS.csv must have; ``collect`` writes these and EXTRA_COLUMNS.
COLUMNS = ("run", "params", "flops", "images_seen", "sigma", "loss")
EXTRA_COLUMNS = ("step", "loss_stderr", "optimal_loss")
#: What F can be.
X_CHOICES = ("flops", "params", "images_seen")
#: Fewest rows a fit takes (two points always lie on a line: ρ = ±1 says nothing).
MIN_ROWS = 3


@dataclass(frozen=True)
class RunRow:
    """One row of RUNS.csv: a run's checkpoint at one σ (None: the total loss)."""

    run: str
    params: float
    flops: float
    images_seen: float
    sigma: float | None
    loss: float
    extra: dict[str, str] = field(default_factory=dict)

    def x(self, name: str) -> float:
        """F: flops, params or images_seen."""
        return float(getattr(self, name))


@dataclass(frozen=True)
class PowerLawFit:
    """y = β·F^α fitted in log–log (y = J raw, or J − J* subtracted); ρ and residuals in
    log–log, R² of Ĵ = ŷ (+ J*) against J in linear units; ``dropped`` lists the rows with
    y ≤ 0 (J ≤ J*) as (run, F, J)."""

    alpha: float
    beta: float
    rho: float
    r2: float
    n: int
    residuals: tuple[float, ...]
    dropped: tuple[tuple[str, float, float], ...] = ()

    def to_json(self, with_dropped: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "alpha": self.alpha,
            "beta": self.beta,
            "rho": self.rho,
            "r2": self.r2,
            "n": self.n,
            "residuals": list(self.residuals),
        }
        if with_dropped:
            out["dropped_rows"] = len(self.dropped)
            out["dropped"] = [{"run": r, "x": x, "loss": j} for r, x, j in self.dropped]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PowerLawFit:
        """Read what ``to_json`` writes (``dropped_rows`` is derived)."""
        dropped = tuple((d["run"], d["x"], d["loss"]) for d in obj.get("dropped", ()))
        keys = ("alpha", "beta", "rho", "r2", "n")
        return cls(**{k: obj[k] for k in keys}, residuals=tuple(obj["residuals"]), dropped=dropped)


@dataclass(frozen=True)
class OffsetFit:
    """J = β·F^α + c with c free; standard errors from curve_fit's covariance (None where it
    is singular); ``c_minus_optimal`` = c − J*."""

    alpha: float
    beta: float
    c: float
    alpha_stderr: float | None
    beta_stderr: float | None
    c_stderr: float | None
    c_minus_optimal: float
    r2: float

    def to_json(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "c": self.c,
            "c_stderr": self.c_stderr,
            "alpha_stderr": self.alpha_stderr,
            "beta_stderr": self.beta_stderr,
            "c_minus_optimal": self.c_minus_optimal,
            "r2": self.r2,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> OffsetFit:
        return cls(**obj)


@dataclass(frozen=True)
class SigmaFit:
    """The three fits at one σ (None: the total loss) against J* = ``optimal_loss``, on ``n``
    rows; ``x`` and ``loss`` are those rows (for plots: a fit read from its JSON has none)."""

    sigma: float | None
    optimal_loss: float
    n: int
    raw: PowerLawFit
    subtracted: PowerLawFit
    offset: OffsetFit | None
    x: tuple[float, ...] = ()
    loss: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "optimal_loss": self.optimal_loss,
            "n": self.n,
            "raw": self.raw.to_json(with_dropped=False),
            "subtracted": self.subtracted.to_json(with_dropped=True),
            "offset": None if self.offset is None else self.offset.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SigmaFit:
        """Read what ``to_json`` writes (without the rows ``x``, ``loss``)."""
        offset = obj["offset"]
        return cls(
            sigma=obj["sigma"],
            optimal_loss=obj["optimal_loss"],
            n=obj["n"],
            raw=PowerLawFit.from_json(obj["raw"]),
            subtracted=PowerLawFit.from_json(obj["subtracted"]),
            offset=None if offset is None else OffsetFit.from_json(offset),
        )

    def row(self) -> dict[str, Any]:
        """The fit as one flat row (``ScalingFit.to_csv``): sigma, optimal_loss, n, then each
        fit's numbers prefixed by its name (raw_alpha, subtracted_dropped_rows, …)."""
        obj = self.to_json()
        out = {k: obj[k] for k in ("sigma", "optimal_loss", "n")}
        for name in ("raw", "subtracted", "offset"):
            numbers = (obj[name] or {}).items()
            out.update({f"{name}_{k}": v for k, v in numbers if k not in ("residuals", "dropped")})
        return out


#: The columns of ``ScalingFit.to_csv``: a fit's row key and its unit.
CSV_COLUMNS = {
    "sigma": "VE sigma (empty: the total loss)",
    "optimal_loss": "x0 units per element",
    "n": "rows",
    **{f"{fit}_{k}": unit for fit in ("raw", "subtracted") for k, unit in (
        ("alpha", "dimensionless"), ("beta", "x0 units per element / F^alpha"),
        ("rho", "dimensionless"), ("r2", "dimensionless"))},
    "subtracted_dropped_rows": "rows",
    **{f"offset_{k}": unit for k, unit in (
        ("alpha", "dimensionless"), ("beta", "x0 units per element / F^alpha"),
        ("c", "x0 units per element"), ("c_stderr", "x0 units per element"),
        ("alpha_stderr", "dimensionless"), ("beta_stderr", "x0 units per element / F^alpha"),
        ("c_minus_optimal", "x0 units per element"), ("r2", "dimensionless"))},
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ScalingFit(Result):
    """All fits of a RUNS.csv against F = ``x`` (``fit_scaling``). A ``Result``
    ("lossfloor-scaling-fit"): ``save`` writes what ``lossfloor scaling fit --out`` writes,
    ``load`` reads it back (the fits without their rows), ``to_csv`` one row per fit."""

    FORMAT: ClassVar[str] = "lossfloor-scaling-fit"
    WHAT: ClassVar[str] = "a scaling fit"
    DECODE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "fits": lambda fs: tuple(SigmaFit.from_json(f) for f in fs)
    }
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = CSV_COLUMNS

    x: str
    fits: tuple[SigmaFit, ...]

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Self:
        """Read what ``json_fields`` writes: x and fits are required."""
        if not isinstance(body.get("fits"), list) or "x" not in body:
            raise UserError("not a scaling fit: expected x and fits")
        try:
            return super().from_fields(body)
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a scaling fit: no {exc}") from None

    def rows(self) -> list[dict[str, Any]]:
        """One row per fit (``SigmaFit.row``)."""
        return [f.row() for f in self.fits]

    def plot(self, axes: Sequence[Axes] | None = None) -> list[Axes]:
        """One panel per fit on ``axes`` (a new pyplot figure's without): J against F, both
        fits, J*: ``plots.draw_scaling``. Returns the axes. Needs the rows: a fit computed by
        ``fit_scaling``, not one read from its JSON."""
        from lossfloor.plots import draw_scaling

        if any(not f.x for f in self.fits):
            raise UserError("a scaling fit read from its JSON has no rows to plot; fit the runs")
        return draw_scaling(self, axes)


# --- reading ---------------------------------------------------------------------------------


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{path}, line {line}: {column} = {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"{path}, line {line}: {column} = {text!r} is not finite")
    return value


def read_runs(path: str | os.PathLike[str]) -> list[RunRow]:
    """The rows of RUNS.csv; UserError for a missing file or column, an empty file, or a cell
    that is not a finite number (sigma may be empty: the total loss)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise UserError(f"{p} is empty; expected a header {','.join(COLUMNS)} and rows")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"{p}: missing column(s) {', '.join(missing)}; need {','.join(COLUMNS)}"
            )
        rows = []
        for i, rec in enumerate(reader, start=2):
            if any(rec.get(c) is None for c in COLUMNS):
                raise UserError(f"{p}, line {i}: fewer cells than columns")
            sigma_text = rec["sigma"].strip()
            sigma = None if sigma_text == "" else _number(p, i, "sigma", sigma_text)
            if sigma is not None and sigma <= 0:
                raise UserError(f"{p}, line {i}: sigma = {sigma_text} must be > 0 (or empty)")
            nums = {c: _number(p, i, c, rec[c]) for c in ("params", "flops", "images_seen", "loss")}
            extra = {k: v for k, v in rec.items() if k not in COLUMNS and k is not None}
            rows.append(RunRow(run=rec["run"], sigma=sigma, extra=extra, **nums))
    if not rows:
        raise UserError(f"{p} has a header but no rows")
    return rows


def write_runs(path: str | os.PathLike[str], rows: Sequence[RunRow]) -> None:
    """Write rows as RUNS.csv (COLUMNS, then the extra columns the rows carry), atomically."""
    extra = [c for c in EXTRA_COLUMNS if any(c in r.extra for r in rows)]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*COLUMNS, *extra])
        for r in rows:
            sigma = "" if r.sigma is None else repr(float(r.sigma))
            nums = [repr(float(v)) for v in (r.params, r.flops, r.images_seen)]
            w.writerow(
                [r.run, *nums, sigma, repr(float(r.loss)), *(r.extra.get(c, "") for c in extra)]
            )


# --- fitting ---------------------------------------------------------------------------------


def _r2(j: np.ndarray, j_hat: np.ndarray) -> float:
    """1 − Σ(J − Ĵ)²/Σ(J − J̄)² (nan when J is constant)."""
    total = float(np.sum((j - j.mean()) ** 2))
    return 1.0 - float(np.sum((j - j_hat) ** 2)) / total if total > 0 else math.nan


def power_law_fit(
    x: np.ndarray, loss: np.ndarray, floor: float = 0.0, runs: Sequence[str] | None = None
) -> PowerLawFit:
    """y = J − floor = β·F^α by least squares on (ln F, ln y) over the rows with y > 0 (the
    others are returned in ``dropped``); ρ = Pearson(ln F, ln y), R² of Ĵ = floor + β·F^α
    against J. UserError if fewer than MIN_ROWS rows remain or F is constant."""
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    names = list(runs) if runs is not None else [""] * x.size
    y = loss - floor
    keep = y > 0
    dropped = tuple((names[i], float(x[i]), float(loss[i])) for i in np.flatnonzero(~keep))
    if keep.sum() < MIN_ROWS:
        raise UserError(
            f"{int(keep.sum())} of {x.size} rows have J > J* = {floor:.6g}; a fit needs at "
            f"least {MIN_ROWS} (the rows' losses are at or below the optimal loss)"
            if floor > 0 or dropped
            else f"{x.size} rows; a fit needs at least {MIN_ROWS}"
        )
    lx, ly = np.log(x[keep]), np.log(y[keep])
    if np.ptp(lx) == 0:
        raise UserError(f"every row has the same F = {x[keep][0]:g}: nothing to fit")
    alpha, ln_beta = np.polyfit(lx, ly, 1)
    rho = float(np.corrcoef(lx, ly)[0, 1]) if np.ptp(ly) > 0 else math.nan
    resid = ly - (ln_beta + alpha * lx)
    j_hat = floor + np.exp(ln_beta + alpha * lx)
    return PowerLawFit(
        alpha=float(alpha),
        beta=float(math.exp(ln_beta)),
        rho=rho,
        r2=_r2(loss[keep], j_hat),
        n=int(keep.sum()),
        residuals=tuple(float(r) for r in resid),
        dropped=dropped,
    )


def offset_fit(x: np.ndarray, loss: np.ndarray, optimal_loss: float) -> OffsetFit | None:
    """J = β·F^α + c by ``curve_fit`` on relative residuals (sigma = J), in (α, ln β, c),
    started from the log–log fit of J − c₀ with c₀ = min(J)/2; β's standard error is
    β·se(ln β). None if the fit does not converge."""
    from scipy.optimize import curve_fit

    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    # three parameters need a residual degree of freedom; relative residuals need J > 0
    if x.size < MIN_ROWS + 1 or not loss.min() > 0:
        return None
    lx = np.log(x)
    c0 = 0.5 * float(loss.min())
    a0, lb0 = np.polyfit(lx, np.log(loss - c0), 1)

    def model(u: np.ndarray, a: float, lb: float, c: float) -> np.ndarray:
        return np.exp(lb + a * u) + c

    with warnings.catch_warnings():  # a singular covariance is reported as None, not printed
        warnings.simplefilter("ignore")
        try:
            popt, pcov = curve_fit(model, lx, loss, p0=[a0, lb0, c0], sigma=loss, maxfev=20000)
        except (RuntimeError, ValueError):
            return None
    a, lb, c = (float(v) for v in popt)
    se = np.sqrt(np.diag(pcov)) if np.all(np.isfinite(pcov)) else None
    return OffsetFit(
        alpha=a,
        beta=math.exp(lb),
        c=c,
        alpha_stderr=None if se is None else float(se[0]),
        beta_stderr=None if se is None else float(math.exp(lb) * se[1]),
        c_stderr=None if se is None else float(se[2]),
        c_minus_optimal=c - optimal_loss,
        r2=_r2(loss, model(lx, a, lb, c)),
    )


def _select_sigmas(
    rows: Sequence[RunRow], sigmas: Sequence[float] | None, with_total: bool
) -> list[float | None]:
    """The σ values to fit: every σ of the rows and, ``with_total``, the total (None) where the
    rows hold one; or those requested."""
    present = sorted({r.sigma for r in rows if r.sigma is not None})
    has_total = with_total and any(r.sigma is None for r in rows)
    if sigmas is None:
        return [*present, *([None] if has_total else [])]
    chosen: list[float | None] = []
    for s in sigmas:
        match = [p for p in present if same_sigma(p, s)]
        if not match:
            have = ", ".join(f"{p:g}" for p in present) or "none"
            raise ParameterError("sigma", s, f"no rows at this σ (the file has: {have})")
        chosen.append(match[0])
    return chosen


def total_left_out(rows: Sequence[RunRow], curve: Curve, sigmas: Sequence[float] | None) -> bool:
    """Whether ``fit_scaling`` leaves the rows' total loss out: they hold one, no σ were
    chosen, and the estimate has no total (J* of the total needs the runs' schedule)."""
    return sigmas is None and curve.total is None and any(r.sigma is None for r in rows)


def fit_scaling(
    rows: Sequence[RunRow],
    curve: Curve,
    x: str = "flops",
    sigmas: Sequence[float] | None = None,
) -> ScalingFit:
    """Raw, subtracted and offset fits of J against F = ``x`` per σ (pooled over runs and
    checkpoints) and for the total loss. J*(σ) = ``curve(σ)`` (linear in ln σ; a σ outside
    the curve's grid is an error), J* of the total = ``curve.total``'s (it must have been
    estimated under the runs' schedule; without one the total's rows are left out:
    ``total_left_out`` says whether they were). ``sigmas`` restricts the σ values fitted."""
    _check_rows(rows, x)
    chosen = _select_sigmas(rows, sigmas, with_total=curve.total is not None)
    if not chosen:
        raise UserError(
            "the rows hold only a total loss but the estimate has no total; estimate J* with "
            "--total and the runs' schedule"
        )
    return ScalingFit(x=x, fits=tuple(_sigma_fit(rows, curve, x, sigma) for sigma in chosen))


def _check_rows(rows: Sequence[RunRow], x: str) -> None:
    """A one-line error unless ``x`` names a measure of F and every row has F > 0."""
    if x not in X_CHOICES:
        raise ParameterError("x", x, f"must be one of: {', '.join(X_CHOICES)}")
    if not rows:
        raise UserError("no rows to fit")
    bad = [r for r in rows if not r.x(x) > 0]
    if bad:
        raise UserError(
            f"{x} = {bad[0].x(x):g} (run {bad[0].run!r}) is not > 0: a power law needs F > 0; "
            "drop the rows of step 0"
        )


def _optimal_at(curve: Curve, sigma: float | None) -> float:
    """J* at ``sigma`` (None: the total's), from ``curve``; a σ outside its grid is an error."""
    if sigma is None:
        assert curve.total is not None  # _select_sigmas leaves the total out without one
        return curve.total.optimal_loss
    lo, hi = float(curve.sigmas[0]), float(curve.sigmas[-1])
    if not lo * (1 - SIGMA_RTOL) <= sigma <= hi * (1 + SIGMA_RTOL):
        raise UserError(
            f"σ = {sigma:g} of the runs is outside the estimate's grid [{lo:g}, {hi:g}]; "
            "estimate J* on a grid that covers it"
        )
    return float(curve(sigma))


def _sigma_fit(rows: Sequence[RunRow], curve: Curve, x: str, sigma: float | None) -> SigmaFit:
    """The raw, subtracted and offset fits of the rows at ``sigma`` (None: the total)."""
    sel = [r for r in rows if r.sigma == sigma]
    where = "the total loss" if sigma is None else f"σ = {sigma:g}"
    floor = _optimal_at(curve, sigma)
    fx = np.array([r.x(x) for r in sel])
    fj = np.array([r.loss for r in sel])
    names = [r.run for r in sel]
    try:
        raw = power_law_fit(fx, fj, 0.0, names)
        sub = power_law_fit(fx, fj, floor, names)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return SigmaFit(
        sigma=sigma,
        optimal_loss=floor,
        raw=raw,
        subtracted=sub,
        offset=offset_fit(fx, fj, floor),
        n=len(fx),
        x=tuple(float(v) for v in fx),
        loss=tuple(float(v) for v in fj),
    )

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

``read_runs`` (``scaling/runs.py``) reads RUNS.csv (``run,params,flops,images_seen,sigma,loss``;
sigma empty for the total loss; other columns are kept but unused); ``fit_scaling`` fits it
against a ``Curve`` into a ``ScalingFit`` (``scaling/results.py``). This module and those two
are the pure fit (numpy, scipy; nothing above ``lossfloor.optimal``);
``lossfloor.scaling.collection.collect`` measures the rows from training runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lossfloor.errors import ParameterError, UserError
from lossfloor.scaling.results import OffsetFit, PowerLawFit, ScalingFit, SigmaFit
from lossfloor.scaling.runs import RunRow
from lossfloor.sigmas import SIGMA_RTOL, same_sigma

if TYPE_CHECKING:
    from lossfloor.optimal import Curve

#: What F can be.
X_CHOICES = ("flops", "params", "images_seen")
#: Fewest rows a fit takes (two points always lie on a line: ρ = ±1 says nothing).
MIN_ROWS = 3


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

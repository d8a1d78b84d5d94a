"""Plots of curves, diagnoses, floors, scaling fits and schedules (matplotlib).

Each ``draw_*`` draws one result on axes it is given and returns them: a plot of one panel
takes and returns an ``Axes`` (``ax``), a plot of several panels a sequence of them (``axes``,
one per panel, returned as a list). Without axes it makes its own in a new pyplot figure (shown
inline in a notebook, by ``plt.show()`` in a script); the results' ``plot`` methods call these.
Each ``plot_*`` writes a PNG: its panels in a ``matplotlib.figure.Figure`` (no pyplot, so no
backend and no window), drawn by ``draw_*`` and saved atomically.

Nothing here picks a matplotlib backend (the CLI does), and importing it imports no pyplot. The
results are typed by what is read from them (the protocols below), so this module imports none
of them and sits below them all in docs/architecture.md's layering.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from lossfloor.io import save_with

if TYPE_CHECKING:
    from matplotlib.axes import Axes


# ----- what the plots read from the results ---------------------------------------------------
class CurvePointLike(Protocol):
    """A point of ``optimal.Curve``."""

    @property
    def sigma(self) -> float: ...
    @property
    def resolved(self) -> bool | None: ...
    @property
    def memorised(self) -> bool | None: ...
    @property
    def upper_bound(self) -> float | None: ...


class CurveLike(Protocol):
    """``optimal.Curve``: its points and, sorted by σ, the σ, J* and standard errors."""

    @property
    def points(self) -> Sequence[CurvePointLike]: ...
    @property
    def sigmas(self) -> np.ndarray: ...
    @property
    def values(self) -> np.ndarray: ...
    @property
    def stderrs(self) -> np.ndarray: ...


class GapPointLike(Protocol):
    """A point of ``diagnosis.Diagnosis``."""

    @property
    def sigma(self) -> float: ...
    @property
    def model_loss(self) -> float: ...
    @property
    def optimal_loss(self) -> float: ...
    @property
    def gap(self) -> float: ...
    @property
    def gap_stderr(self) -> float: ...


class DiagnosisLike(Protocol):
    """``diagnosis.Diagnosis``."""

    @property
    def points(self) -> Sequence[GapPointLike]: ...


class PowerLawLike(Protocol):
    """``scaling.PowerLawFit``: J = β·F^α (+ J*), ρ the correlation of the log–log fit."""

    @property
    def alpha(self) -> float: ...
    @property
    def beta(self) -> float: ...
    @property
    def rho(self) -> float: ...


class SigmaFitLike(Protocol):
    """``scaling.SigmaFit``: the rows fitted at σ (None: the total) and both fits."""

    @property
    def sigma(self) -> float | None: ...
    @property
    def optimal_loss(self) -> float: ...
    @property
    def raw(self) -> PowerLawLike: ...
    @property
    def subtracted(self) -> PowerLawLike: ...
    @property
    def x(self) -> Sequence[float]: ...
    @property
    def loss(self) -> Sequence[float]: ...


class ScalingFitLike(Protocol):
    """``scaling.ScalingFit``: the x axis' name and a fit per σ."""

    @property
    def x(self) -> str: ...
    @property
    def fits(self) -> Sequence[SigmaFitLike]: ...


class SizePointLike(Protocol):
    """``floor.SizePoint``: J* of n-subsets."""

    @property
    def n(self) -> int: ...
    @property
    def optimal_loss(self) -> float: ...


class FloorPointLike(Protocol):
    """``floor.FloorPoint``."""

    @property
    def sigma(self) -> float: ...
    @property
    def lower(self) -> float: ...
    @property
    def upper(self) -> float: ...
    @property
    def extrapolated(self) -> float: ...
    @property
    def converged(self) -> bool: ...
    @property
    def verdict(self) -> str: ...
    @property
    def crossing(self) -> str | None: ...
    @property
    def by_n(self) -> Sequence[SizePointLike]: ...


class FloorLike(Protocol):
    """``floor.Floor``."""

    @property
    def points(self) -> Sequence[FloorPointLike]: ...


# ----- figures ----------------------------------------------------------------------------
def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """``fig`` as a PNG at ``path`` (120 dpi, tight bounding box), written atomically."""
    save_with(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))


def new_figure(
    rows: int, cols: int, figsize: tuple[float, float], *, pyplot: bool, **kwargs: Any
) -> tuple[Figure, list[Axes]]:
    """A new figure of ``figsize`` inches and its rows × cols axes (row by row): a pyplot
    figure (``pyplot``: the current backend shows it) or a bare ``Figure`` (drawn to files
    only); ``kwargs`` go to ``Figure.subplots``."""
    if pyplot:
        import matplotlib.pyplot as plt  # only here: importing this module loads no pyplot

        fig = plt.figure(figsize=figsize)
    else:
        fig = Figure(figsize=figsize)
    return fig, list(np.ravel(fig.subplots(rows, cols, squeeze=False, **kwargs)))


def _panels(axes: Sequence[Axes] | None, count: int, layout: dict[str, Any]) -> list[Axes]:
    """``axes`` (at least ``count``), or pyplot axes of the plot's own ``layout``."""
    if axes is None:
        return new_figure(pyplot=True, **layout)[1]
    if len(axes) < count:
        raise ValueError(f"this plot has {count} panels: got {len(axes)} axes")
    return list(axes)


#: The panels of each plot when it makes its own figure: rows, columns, size (inches) and
#: the options of ``Figure.subplots``.
CURVE_LAYOUT: dict[str, Any] = {"rows": 1, "cols": 1, "figsize": (6.4, 4.4)}
DIAGNOSIS_LAYOUT: dict[str, Any] = {"rows": 2, "cols": 1, "figsize": (6.4, 6.4), "sharex": True,
                                    "height_ratios": [3, 2]}  # fmt: skip
FLOOR_LAYOUT: dict[str, Any] = {"rows": 1, "cols": 2, "figsize": (11, 4.4)}
SCHEDULE_LAYOUT: dict[str, Any] = {"rows": 1, "cols": 1, "figsize": (6.8, 4.4)}


def scaling_layout(panels: int) -> dict[str, Any]:
    """Up to 3 panels a row, 4.2 × 3.4 inches each."""
    cols = min(3, panels)
    rows = -(-panels // cols)
    return {"rows": rows, "cols": cols, "figsize": (4.2 * cols, 3.4 * rows)}


#: The legend entry of values drawn at a log axis' floor (0, or too small to show).
BELOW_FLOOR = "0 / below floor"


def log_floor(values: Sequence[np.ndarray]) -> float:
    """The bottom of a log axis for ``values``: a third of the smallest positive value, but at
    least max·1e-8 (1 where no value is positive)."""
    flat = np.concatenate([np.ravel(v) for v in values])
    positive = flat[flat > 0]
    if not positive.size:
        return 1.0
    return max(float(positive.min()) / 3, float(positive.max()) * 1e-8)


def plot_floored(
    ax: Axes, s: np.ndarray, v: np.ndarray, floor: float, fmt: str, **kwargs: Any
) -> None:
    """``v`` against ``s`` on a log y axis, values below ``floor`` (0 included) drawn at the
    floor with an open black ▽ (one legend entry BELOW_FLOOR per axes)."""
    ax.plot(s, np.maximum(v, floor), fmt, **kwargs)
    low = v < floor
    if low.any():
        shown = BELOW_FLOOR in ax.get_legend_handles_labels()[1]
        ax.plot(s[low], np.full(int(low.sum()), floor), "v", ms=8, mfc="none", color="k",
                label=None if shown else BELOW_FLOOR, zorder=3)  # fmt: skip


# ----- J*(σ) ------------------------------------------------------------------------------
def draw_optimal_loss(
    curves: Sequence[tuple[str, CurveLike]],
    ax: Axes | None = None,
    *,
    data_variance: float | None = None,
    title: str = "",
) -> Axes:
    """J*(σ) per element against σ (log–log), one line per (label, curve), ±2 s.e.; values
    below the floor (``log_floor``) drawn at it and marked ▽; points the draws do not resolve
    (``resolved`` false) hollow (UNRESOLVED); where J* is memorised and unresolved, no
    estimate but a ▼ at its upper bound (MEMORISED; at the floor where the bound is below it:
    J* ≤ the floor is true as well). Returns the axes."""
    (ax,) = _panels(None if ax is None else [ax], 1, CURVE_LAYOUT)
    marks = [_marks(c) for _, c in curves]
    floor = log_floor(
        [c.values[~bounded] for (_, c), (_, bounded, _) in zip(curves, marks, strict=True)]
        + [bounds[bounded] for _, bounded, bounds in marks]
    )
    for i, ((label, curve), (unresolved, bounded, bounds)) in enumerate(
        zip(curves, marks, strict=True)
    ):
        shown, color = ~bounded, f"C{i}"
        s, v, se = curve.sigmas[shown], curve.values[shown], curve.stderrs[shown]
        plot_floored(ax, s, v, floor, "o-", ms=3, label=label, color=color)
        lo = np.maximum(v - 2 * se, np.maximum(v / 10, floor))
        ax.fill_between(s, lo, np.maximum(v + 2 * se, floor), alpha=0.25, color=color)
        hollow = unresolved[shown]
        if hollow.any():
            _once(ax, s[hollow], np.maximum(v[hollow], floor), "o", UNRESOLVED, ms=6,
                  mfc="white", color=color, zorder=4)  # fmt: skip
        if bounded.any():
            _once(ax, curve.sigmas[bounded], np.maximum(bounds[bounded], floor), "v", MEMORISED,
                  ms=8, color=color, zorder=4)  # fmt: skip
    ax.set_ylim(bottom=floor / 1.5)
    if data_variance is not None:
        ax.axhline(data_variance, color="gray", ls="--", lw=1, label="data variance (σ→∞)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("σ (VE)")
    ax.set_ylabel("optimal loss J*(σ) per element (x0 units)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax


def plot_optimal_loss(
    path: str | os.PathLike[str],
    curves: Sequence[tuple[str, CurveLike]],
    *,
    data_variance: float | None = None,
    title: str = "",
) -> None:
    """``draw_optimal_loss`` as a PNG at ``path``."""
    fig, (ax,) = new_figure(pyplot=False, **CURVE_LAYOUT)
    draw_optimal_loss(curves, ax, data_variance=data_variance, title=title)
    save_figure(fig, path)


#: The legend entries of the estimate plot's unresolved points and memorised bounds.
UNRESOLVED = "unresolved (too few effective draws)"
MEMORISED = "J* ≤ bound (memorised)"


def _marks(curve: CurveLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over ``curve.sigmas``: (unresolved: the draws do not resolve the point; bounded: of
    those, J* is memorised, its ``upper_bound`` reported instead; the bounds, NaN where none)."""
    pts = sorted(curve.points, key=lambda p: p.sigma)
    unresolved = np.array([p.resolved is False for p in pts])
    bounded = unresolved & np.array([bool(p.memorised) for p in pts])
    bounds = np.array([np.nan if p.upper_bound is None else p.upper_bound for p in pts])
    return unresolved, bounded, bounds


def _once(ax: Axes, s: np.ndarray, v: np.ndarray, fmt: str, label: str, **kwargs: Any) -> None:
    """Markers with a legend entry ``label`` on its first use in the axes."""
    shown = label in ax.get_legend_handles_labels()[1]
    ax.plot(s, v, fmt, ls="none", label=None if shown else label, **kwargs)


# ----- the gap ----------------------------------------------------------------------------
def draw_diagnosis(
    diagnosis: DiagnosisLike, axes: Sequence[Axes] | None = None, title: str = ""
) -> list[Axes]:
    """Two panels: J* and J_θ against σ (log axes), values below the floor (``log_floor``)
    drawn at it and marked ▽; the gap ± 2 s.e. Returns [the losses' axes, the gap's]."""
    a, b = _panels(axes, 2, DIAGNOSIS_LAYOUT)[:2]
    pts = diagnosis.points
    s = np.array([p.sigma for p in pts])
    jm = np.array([p.model_loss for p in pts])
    jo = np.array([p.optimal_loss for p in pts])
    g = np.array([p.gap for p in pts])
    gse = np.array([p.gap_stderr for p in pts])
    floor = log_floor([jm, jo])
    plot_floored(a, s, jm, floor, "o-", ms=3, label="model J_θ(σ)")
    plot_floored(a, s, jo, floor, "s-", ms=3, label="optimal J*(σ)")
    a.set(xscale="log", yscale="log", ylabel="loss per element (x0 units)", title=title)
    a.set_ylim(bottom=floor / 1.5)
    b.errorbar(s, g, yerr=2 * gse, fmt="o-", ms=3, capsize=2, color="C3")
    b.axhline(0, color="gray", lw=0.8)
    b.set(xscale="log", xlabel="σ (VE)", ylabel="gap J_θ − J*")
    b.text(0.01, 0.97, "where J* ≈ 0 the optimum memorises: a gap there is\npartly the price "
           "of generalisation, not only underfitting", transform=b.transAxes, va="top",
           fontsize=7, color="gray")  # fmt: skip
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    a.legend()
    return [a, b]


def plot_diagnosis(path: str | os.PathLike[str], diagnosis: DiagnosisLike, title: str = "") -> None:
    """``draw_diagnosis`` as a PNG at ``path`` (the panels one above the other, σ shared)."""
    fig, axes = new_figure(pyplot=False, **DIAGNOSIS_LAYOUT)
    draw_diagnosis(diagnosis, axes, title)
    save_figure(fig, path)


# ----- scaling ----------------------------------------------------------------------------
#: A panel's J* below this fraction of its smallest loss is ≈ 0 for the fit (J − J* = J to
#: 0.1%, the subtracted fit is the raw one): no J* line (it would stretch the log axis decades
#: below the data), the panel's title says so.
NEGLIGIBLE_OPTIMAL = 1e-3


def draw_scaling(result: ScalingFitLike, axes: Sequence[Axes] | None = None) -> list[Axes]:
    """One panel per σ (and the total), in ``result.fits``' order, axes beyond them turned off:
    J against F on log axes, the raw fit β·F^α and the subtracted fit J* + β·F^α, J* dashed;
    rows with J ≤ J* marked ×. The y axis spans the runs, the fits and J*, except where J* <
    NEGLIGIBLE_OPTIMAL·(the smallest loss): there J* is not drawn and the title is marked
    "J* ≈ 0". Returns all the axes."""
    n = len(result.fits)
    panels = _panels(axes, n, scaling_layout(n))
    for ax, f in zip(panels, result.fits, strict=False):
        x, j = np.array(f.x), np.array(f.loss)
        grid = np.geomspace(x.min(), x.max(), 100)
        above = j > f.optimal_loss
        ax.plot(x[above], j[above], "o", ms=3, color="k", alpha=0.6, label="runs")
        if (~above).any():
            ax.plot(x[~above], j[~above], "x", ms=5, color="C3", label="J ≤ J*")
        r, s = f.raw, f.subtracted
        raw, sub = r.beta * grid**r.alpha, f.optimal_loss + s.beta * grid**s.alpha
        ax.plot(grid, raw, "-", color="C0", label=f"raw α={r.alpha:.3g} ρ={r.rho:.3f}")
        ax.plot(grid, sub, "-", color="C1", label=f"J*+βF^α α={s.alpha:.3g} ρ={s.rho:.3f}")
        shown = [j, raw, sub]
        negligible = f.optimal_loss < NEGLIGIBLE_OPTIMAL * float(j.min())
        if f.optimal_loss > 0 and not negligible:
            ax.axhline(f.optimal_loss, color="C1", ls="--", lw=0.8, label="J*")
            shown.append(np.array([f.optimal_loss]))
        values = np.concatenate(shown)
        values = values[values > 0]
        ax.set_ylim(values.min() / 1.5, values.max() * 1.5)
        title = "total loss" if f.sigma is None else f"σ = {f.sigma:.3g}"
        title += f" (J* ≈ 0: {f.optimal_loss:.2g})" if negligible else ""
        ax.set(xscale="log", yscale="log", xlabel=result.x, ylabel="loss per element",
               title=title)  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in panels[n:]:
        ax.axis("off")
    return panels


def plot_scaling(path: str | os.PathLike[str], result: ScalingFitLike) -> Figure:
    """``draw_scaling`` as a PNG at ``path`` (3 panels a row). Returns the figure."""
    fig, axes = new_figure(pyplot=False, **scaling_layout(len(result.fits)))
    draw_scaling(result, axes)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# ----- the floor --------------------------------------------------------------------------
def draw_floor(
    result: FloorLike, axes: Sequence[Axes] | None = None, title: str = ""
) -> list[Axes]:
    """Two panels: the bracket [J*_train(N), least held-out bound] against σ (log axes), J* of
    each subset size and the extrapolation, lower > upper marked ◇ (``FloorPoint.crossing``:
    open within error, filled beyond); J*(n)/J*(N) against n per σ not memorised (the
    N-trend). Points with J* = 0 are drawn at the axis floor as open markers. Returns [the
    bracket's axes, the N-trend's]."""
    a, b = _panels(axes, 2, FLOOR_LAYOUT)[:2]
    pts = result.points
    s = np.array([p.sigma for p in pts])
    lo, up = np.array([p.lower for p in pts]), np.array([p.upper for p in pts])
    positive = np.concatenate([lo[lo > 0], up[up > 0]])
    bottom = max(float(positive.min()) / 3, float(up.max()) * 1e-8) if positive.size else 1e-12
    _draw_bracket(a, pts, s, lo, up, bottom)
    _mark_floor_points(a, pts, s, lo, bottom)
    a.set(
        xscale="log",
        yscale="log",
        xlabel="σ (VE)",
        ylim=(bottom, None),
        ylabel="loss per element (x0 units)",
        title=title or "generalising floor",
    )
    a.text(
        0.01, 0.01, "green lines: J* converged in N", transform=a.transAxes, fontsize=7, color="C2"
    )
    _draw_n_trend(b, pts)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    return [a, b]


def _draw_bracket(
    a: Axes,
    pts: Sequence[FloorPointLike],
    s: np.ndarray,
    lo: np.ndarray,
    up: np.ndarray,
    bottom: float,
) -> None:
    """J* of each subset size, the bracket [lo, up] shaded, the least held-out bound and the
    extrapolated J*_∞ against σ (values below ``bottom`` drawn at it)."""
    sizes = [q.n for q in pts[0].by_n]
    viridis = matplotlib.colormaps["viridis"]
    for k, n in enumerate(sizes):
        v = np.array([p.by_n[k].optimal_loss for p in pts])
        a.plot(
            s,
            np.maximum(v, bottom),
            "-",
            lw=0.8,
            color=viridis(k / max(1, len(sizes) - 1)),
            label=f"J* of n = {n}",
        )
    a.fill_between(
        s,
        np.maximum(lo, bottom),
        np.maximum(up, bottom),
        color="C1",
        alpha=0.2,
        label="bracket [J*_train, held-out bound]",
    )
    a.plot(s, np.maximum(up, bottom), "v-", ms=4, color="C1", label="least held-out bound")
    a.plot(
        s,
        np.maximum([p.extrapolated for p in pts], bottom),
        "x--",
        ms=4,
        color="C3",
        label="extrapolated J*_∞",
    )


def _mark_floor_points(
    a: Axes, pts: Sequence[FloorPointLike], s: np.ndarray, lo: np.ndarray, bottom: float
) -> None:
    """J* = 0 as open markers at ``bottom``, lower > upper as ◇ (open within error, filled
    beyond), and a green line at each σ where J* is converged in N."""
    zero = lo <= 0
    if zero.any():
        a.plot(
            s[zero],
            np.full(zero.sum(), bottom),
            "o",
            mfc="none",
            color="k",
            label="J* = 0 (drawn at the floor)",
        )
    for kind, fill in (("within error", "none"), ("beyond error", "C3")):
        crossed = [p for p in pts if p.crossing == kind]
        if crossed:
            a.plot([p.sigma for p in crossed], [max(p.lower, bottom) for p in crossed], "D",
                   ms=6, mfc=fill, color="C3", label=f"lower > upper, {kind}")  # fmt: skip
    for p in pts:
        if p.converged:
            a.axvline(p.sigma, color="C2", lw=0.5, alpha=0.4)


def _draw_n_trend(b: Axes, pts: Sequence[FloorPointLike]) -> None:
    """J*(n)/J*(N) against the subset size n, one line per σ where J* is not memorised."""
    for p in pts:
        last = p.by_n[-1].optimal_loss
        if last > 0 and p.verdict != "memorised":  # J* ≈ 0: the ratio is noise
            ratio = [q.optimal_loss / last for q in p.by_n]
            b.plot(
                [q.n for q in p.by_n], ratio, "o-", ms=3, label=f"σ = {p.sigma:.3g} ({p.verdict})"
            )
    b.axhline(1, color="gray", lw=0.8)
    b.set(xscale="log", xlabel="subset size n", ylabel="J*(n) / J*(N)",
          title="N-trend (memorised σ left out)")  # fmt: skip


def plot_floor(path: str | os.PathLike[str], result: FloorLike, title: str = "") -> Figure:
    """``draw_floor`` as a PNG at ``path`` (the panels side by side). Returns the figure."""
    fig, axes = new_figure(pyplot=False, **FLOOR_LAYOUT)
    draw_floor(result, axes, title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# ----- the optimal-loss schedule ----------------------------------------------------------
def draw_schedule(table: dict[str, Any], ax: Axes | None = None) -> Axes:
    """An optimal-loss schedule (``OptimalLossSchedule.tabulated()``): w(σ) and J*(σ) on log
    axes, the density of ln σ on a twin axis at the right, σ* marked. Returns the left axes
    (the twin shares its x axis)."""
    (ax,) = _panels(None if ax is None else [ax], 1, SCHEDULE_LAYOUT)
    s = np.asarray(table["sigma"])
    w, j = np.asarray(table["weight"]), np.asarray(table["optimal_loss"])
    ax.plot(s, w, color="C0", label="weight w(σ)")
    positive = j > 0
    ax.plot(s[positive], j[positive], color="C2", label="optimal loss J*(σ)")
    star = table["params"]["resolved"]["sigma_star"]
    ax.axvline(star, color="gray", ls=":", lw=1, label=f"σ* = {star:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="σ (VE)", ylabel="w(σ), J*(σ) (x0 units)")
    ax.set_ylim(bottom=max(float(j[positive].min()) if positive.any() else 1e-6, w.max() * 1e-8))
    right = ax.twinx()
    right.plot(s, table["log_sigma_density"], color="C1", label="density of ln σ, p")
    right.set_ylabel("density of ln σ")
    right.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = right.get_legend_handles_labels()
    ax.legend(handles + more, labels + more_labels, fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    params = table["params"]
    gap = "none" if table["gap"] is None else params.get("gap", "table")
    ax.set_title(f"optimal-loss schedule (density: {params.get('density')}, gap: {gap})")
    return ax


def plot_schedule(path: str | os.PathLike[str], table: dict[str, Any]) -> None:
    """``draw_schedule`` as a PNG at ``path``."""
    fig, (ax,) = new_figure(pyplot=False, **SCHEDULE_LAYOUT)
    draw_schedule(table, ax)
    save_figure(fig, path)

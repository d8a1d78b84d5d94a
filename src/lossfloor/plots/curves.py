"""The plot of J*(σ): one line per curve, ±2 s.e., unresolved points hollow, memorised bounds ▼."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lossfloor.plots.common import axes_for, log_floor, new_figure, plot_floored, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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


#: The panel of the plot when it makes its own figure (``new_figure``).
CURVE_LAYOUT: dict[str, Any] = {"rows": 1, "cols": 1, "figsize": (6.4, 4.4)}


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
    (ax,) = axes_for(None if ax is None else [ax], 1, CURVE_LAYOUT)
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

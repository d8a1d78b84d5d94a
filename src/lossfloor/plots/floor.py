"""The plot of a generalising floor: the bracket against σ, and J* against the subset size n."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import matplotlib
import numpy as np

from lossfloor.plots.common import axes_for, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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


#: The panels of the plot when it makes its own figure (``new_figure``).
FLOOR_LAYOUT: dict[str, Any] = {"rows": 1, "cols": 2, "figsize": (11, 4.4)}


def draw_floor(
    result: FloorLike, axes: Sequence[Axes] | None = None, title: str = ""
) -> list[Axes]:
    """Two panels: the bracket [J*_train(N), least held-out bound] against σ (log axes), J* of
    each subset size and the extrapolation, lower > upper marked ◇ (``FloorPoint.crossing``:
    open within error, filled beyond); J*(n)/J*(N) against n per σ not memorised (the
    N-trend). Points with J* = 0 are drawn at the axis floor as open markers. Returns [the
    bracket's axes, the N-trend's]."""
    a, b = axes_for(axes, 2, FLOOR_LAYOUT)[:2]
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

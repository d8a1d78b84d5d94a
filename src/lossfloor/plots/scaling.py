"""The plot of a scaling fit: per σ (and the total), the runs' losses against F and both fits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lossfloor.plots.common import axes_for, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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


def scaling_layout(panels: int) -> dict[str, Any]:
    """Up to 3 panels a row, 4.2 × 3.4 inches each."""
    cols = min(3, panels)
    rows = -(-panels // cols)
    return {"rows": rows, "cols": cols, "figsize": (4.2 * cols, 3.4 * rows)}


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
    panels = axes_for(axes, n, scaling_layout(n))
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

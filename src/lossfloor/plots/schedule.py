"""The plot of an optimal-loss schedule: w(σ), J*(σ) and the density of ln σ."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from lossfloor.plots.common import axes_for, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes


#: The panel of the plot when it makes its own figure (``new_figure``).
SCHEDULE_LAYOUT: dict[str, Any] = {"rows": 1, "cols": 1, "figsize": (6.8, 4.4)}


def draw_schedule(table: dict[str, Any], ax: Axes | None = None) -> Axes:
    """An optimal-loss schedule (``OptimalLossSchedule.tabulated()``): w(σ) and J*(σ) on log
    axes, the density of ln σ on a twin axis at the right, σ* marked. Returns the left axes
    (the twin shares its x axis)."""
    (ax,) = axes_for(None if ax is None else [ax], 1, SCHEDULE_LAYOUT)
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

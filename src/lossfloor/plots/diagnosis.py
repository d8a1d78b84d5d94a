"""The plot of a diagnosis: J* and J_θ against σ, and the gap ± 2 s.e."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lossfloor.plots.common import axes_for, log_floor, new_figure, plot_floored, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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


#: The panels of the plot when it makes its own figure (``new_figure``).
DIAGNOSIS_LAYOUT: dict[str, Any] = {"rows": 2, "cols": 1, "figsize": (6.4, 6.4), "sharex": True,
                                    "height_ratios": [3, 2]}  # fmt: skip


def draw_diagnosis(
    diagnosis: DiagnosisLike, axes: Sequence[Axes] | None = None, title: str = ""
) -> list[Axes]:
    """Two panels: J* and J_θ against σ (log axes), values below the floor (``log_floor``)
    drawn at it and marked ▽; the gap ± 2 s.e. Returns [the losses' axes, the gap's]."""
    a, b = axes_for(axes, 2, DIAGNOSIS_LAYOUT)[:2]
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

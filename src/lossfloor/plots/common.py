"""What every plot shares: new figures and their panels, PNGs written atomically, and log axes
whose values below the axis' floor are drawn at it and marked ▽."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from lossfloor.io import save_with

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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


def axes_for(axes: Sequence[Axes] | None, count: int, layout: dict[str, Any]) -> list[Axes]:
    """``axes`` (at least ``count``), or pyplot axes of the plot's own ``layout``."""
    if axes is None:
        return new_figure(pyplot=True, **layout)[1]
    if len(axes) < count:
        raise ValueError(f"this plot has {count} panels: got {len(axes)} axes")
    return list(axes)


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

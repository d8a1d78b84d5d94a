"""Plots of curves, diagnoses, floors, scaling fits and schedules (matplotlib).

Each ``draw_*`` draws one result on axes it is given and returns them: a plot of one panel
takes and returns an ``Axes`` (``ax``), a plot of several panels a sequence of them (``axes``,
one per panel, returned as a list). Without axes it makes its own in a new pyplot figure (shown
inline in a notebook, by ``plt.show()`` in a script); the results' ``plot`` methods call these.
Each ``plot_*`` writes a PNG: its panels in a ``matplotlib.figure.Figure`` (no pyplot, so no
backend and no window), drawn by ``draw_*`` and saved atomically.

One module per kind of result (``curves``, ``diagnosis``, ``floor``, ``scaling``,
``schedule``), each with its ``draw_*``, ``plot_*`` and the protocols of what it reads; what they
share (figures, panels, PNGs, log axes with a floor) is in ``common``. This package gives their
public names.

Nothing here picks a matplotlib backend (the CLI does), and importing it imports no pyplot. The
results are typed by what is read from them (the protocols), so this package imports none of
them and sits below them all in docs/architecture.md's layering.
"""

from lossfloor.plots.common import (
    BELOW_FLOOR,
    log_floor,
    new_figure,
    plot_floored,
    save_figure,
)
from lossfloor.plots.curves import (
    CURVE_LAYOUT,
    MEMORISED,
    UNRESOLVED,
    CurveLike,
    CurvePointLike,
    draw_optimal_loss,
    plot_optimal_loss,
)
from lossfloor.plots.diagnosis import (
    DIAGNOSIS_LAYOUT,
    DiagnosisLike,
    GapPointLike,
    draw_diagnosis,
    plot_diagnosis,
)
from lossfloor.plots.floor import (
    FLOOR_LAYOUT,
    FloorLike,
    FloorPointLike,
    SizePointLike,
    draw_floor,
    plot_floor,
)
from lossfloor.plots.scaling import (
    NEGLIGIBLE_OPTIMAL,
    PowerLawLike,
    ScalingFitLike,
    SigmaFitLike,
    draw_scaling,
    plot_scaling,
    scaling_layout,
)
from lossfloor.plots.schedule import SCHEDULE_LAYOUT, draw_schedule, plot_schedule

__all__ = [
    "BELOW_FLOOR",
    "CURVE_LAYOUT",
    "DIAGNOSIS_LAYOUT",
    "FLOOR_LAYOUT",
    "MEMORISED",
    "NEGLIGIBLE_OPTIMAL",
    "SCHEDULE_LAYOUT",
    "UNRESOLVED",
    "CurveLike",
    "CurvePointLike",
    "DiagnosisLike",
    "FloorLike",
    "FloorPointLike",
    "GapPointLike",
    "PowerLawLike",
    "ScalingFitLike",
    "SigmaFitLike",
    "SizePointLike",
    "draw_diagnosis",
    "draw_floor",
    "draw_optimal_loss",
    "draw_scaling",
    "draw_schedule",
    "log_floor",
    "new_figure",
    "plot_diagnosis",
    "plot_floor",
    "plot_floored",
    "plot_optimal_loss",
    "plot_scaling",
    "plot_schedule",
    "save_figure",
    "scaling_layout",
]

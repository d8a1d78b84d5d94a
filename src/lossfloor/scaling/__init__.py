"""Scaling laws of the loss minus the optimal loss (docs/method.md §6): the fit
(``lossfloor.scaling.fit``, its results ``.results`` and RUNS.csv ``.runs``, re-exported here;
pure: nothing above ``lossfloor.optimal``) and the collection of its rows from training runs
(``lossfloor.scaling.collection``: models, training, diagnosis), imported by name where it is
needed.
"""

from lossfloor.scaling.fit import (
    MIN_ROWS,
    SIGMA_RTOL,
    X_CHOICES,
    fit_scaling,
    offset_fit,
    power_law_fit,
    total_left_out,
)
from lossfloor.scaling.results import OffsetFit, PowerLawFit, ScalingFit, SigmaFit
from lossfloor.scaling.runs import COLUMNS, EXTRA_COLUMNS, RunRow, read_runs, write_runs

__all__ = [
    "COLUMNS",
    "EXTRA_COLUMNS",
    "MIN_ROWS",
    "SIGMA_RTOL",
    "X_CHOICES",
    "OffsetFit",
    "PowerLawFit",
    "RunRow",
    "ScalingFit",
    "SigmaFit",
    "fit_scaling",
    "offset_fit",
    "power_law_fit",
    "read_runs",
    "total_left_out",
    "write_runs",
]

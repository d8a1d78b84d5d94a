"""Diagnosis: a model's per-σ loss against the optimal loss on the same draws (docs/method.md §4).

    gap(σ) = J_θ(σ) − J*(σ),  J_θ(σ) = E‖D_θ(x0 + σε, σ) − x0‖²/D,  J*(σ) = E‖μ(x0 + σε) − x0‖²/D

Both terms are evaluated on the same (x0, ε) draws (``lossfloor.optimal.draws``), so the gap's
standard error comes from the paired per-sample differences and is small. The draws are plain
(ε ~ N(0, I)) or tilted (``draws.tilted_noise``, the estimate's default): each draw then
carries its likelihood ratio w and every mean is the estimate's, the mean of
``moments.control_variate``(w·v, w) over the per-draw values v (J_θ, J* and their difference
alike), with its standard error. Reading a gap: below
σ* (where J* ≈ 0) the training set's optimum is the memorising denoiser, which a model that
generalises never reaches, so a gap there is partly the price of generalisation, not only
underfitting.

The package by job: ``result`` (``GapPoint``, ``Diagnosis``, its units and columns,
``REL_FLOOR``), ``model`` (the model's per-sample loss on the draws and the σ it accepts),
``paired`` (J* on the same draws, the gap, ``diagnose``), ``from_curve`` (J* read from an
estimate of the same draws). This module gives their public names.
"""

from lossfloor.diagnosis.from_curve import Known, optimal_from_curve
from lossfloor.diagnosis.model import (
    EPS_BOUND,
    DenoiserFn,
    check_model_sigmas,
    loss_factor_of,
    model_per_sample_loss,
    split_by_range,
)
from lossfloor.diagnosis.paired import Pairing, diagnose, optimal_per_sample_loss
from lossfloor.diagnosis.result import (
    CSV_COLUMNS,
    DERIVED,
    DRAWS,
    REL_FLOOR,
    UNITS,
    Diagnosis,
    GapPoint,
)

__all__ = [
    "CSV_COLUMNS",
    "DERIVED",
    "DRAWS",
    "EPS_BOUND",
    "REL_FLOOR",
    "UNITS",
    "DenoiserFn",
    "Diagnosis",
    "GapPoint",
    "Known",
    "Pairing",
    "check_model_sigmas",
    "diagnose",
    "loss_factor_of",
    "model_per_sample_loss",
    "optimal_from_curve",
    "optimal_per_sample_loss",
    "split_by_range",
]

"""The optimal loss J*(σ) of a dataset and its estimators (docs/method.md §2–3)."""

from lossfloor.optimal.capabilities import Capabilities
from lossfloor.optimal.checkpoint import Checkpoint
from lossfloor.optimal.curve import Curve, CurvePoint, Total
from lossfloor.optimal.denoiser import OptimalDenoiser
from lossfloor.optimal.estimate import estimate_curve
from lossfloor.optimal.estimators import (
    CDOL,
    DOL,
    ESTIMATORS,
    SNIS,
    Estimator,
    Full,
    Stratified,
    Subset,
    declared,
    make_estimator,
    resolve_C,
)
from lossfloor.optimal.gram import Gram
from lossfloor.optimal.kernel import SoftmaxState, accumulate_softmax, posterior_mean
from lossfloor.optimal.neighbours import nearest_neighbours, neighbour_tables
from lossfloor.optimal.pools import Pool

__all__ = [
    "CDOL",
    "DOL",
    "ESTIMATORS",
    "SNIS",
    "Capabilities",
    "Checkpoint",
    "Curve",
    "CurvePoint",
    "Estimator",
    "Full",
    "Gram",
    "OptimalDenoiser",
    "Pool",
    "SoftmaxState",
    "Stratified",
    "Subset",
    "Total",
    "accumulate_softmax",
    "declared",
    "estimate_curve",
    "make_estimator",
    "nearest_neighbours",
    "neighbour_tables",
    "posterior_mean",
    "resolve_C",
]

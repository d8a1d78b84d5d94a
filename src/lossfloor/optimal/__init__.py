"""The optimal loss J*(σ) of a dataset and its estimators (docs/method.md §2–3)."""

from lossfloor.optimal.curve import Curve, total_optimal_loss
from lossfloor.optimal.denoiser import OptimalDenoiser
from lossfloor.optimal.estimate import estimate_curve
from lossfloor.optimal.estimators import (
    ESTIMATOR_NAMES,
    Estimator,
    Full,
    Pool,
    Subset,
    make_estimator,
    resolve_C,
)
from lossfloor.optimal.kernel import SoftmaxState, posterior_mean

__all__ = [
    "ESTIMATOR_NAMES",
    "Curve",
    "Estimator",
    "Full",
    "OptimalDenoiser",
    "Pool",
    "SoftmaxState",
    "Subset",
    "estimate_curve",
    "make_estimator",
    "posterior_mean",
    "resolve_C",
    "total_optimal_loss",
]

"""The generalising floor: is J*(σ) of a training set converged in N, and what bounds the
population's optimal loss from above (docs/floor.md has the proofs).

J*_train(σ) is the loss of the denoiser that memorises the training set. Two facts bracket the
population value J*_pop(σ) = E‖x0 − E[x0 | x]‖²/D (x0 from the data distribution):

- lower: E[J*_train(σ)] ≤ J*_pop(σ) (the empirical minimum is at most the empirical risk of the
  population-optimal denoiser, whose expectation is J*_pop), and E[J*] of a random n-subset
  rises toward J*_pop as n grows;
- upper: any denoiser fixed without the held-out data has expected held-out loss ≥ J*_pop: the
  training set's optimal denoiser μ_train and its smoothed version D_b (the posterior mean under
  a Gaussian kernel density estimate of the training set, bandwidth b):

      D_b(x, σ) = (σ²·μ_s(x) + b²·x)/(σ² + b²),   s = √(σ² + b²),

  with μ_s the optimal denoiser of the training set at noise level s (the same kernel).

By job: ``heldout`` computes both held-out losses (``heldout_losses``); ``nested`` J* on nested
random subsets (n = N/2^k … N), the per-σ verdict and the ``floor`` entry point; ``result`` the
result types (``Floor``, ``FloorPoint``, ``SizePoint``); ``reading`` a curve with held-out
losses (``with_heldout``) and a model's gap read through the floor (``read_heldout``). This
package's namespace is the API: import from ``lossfloor.floor``.
"""

from lossfloor.floor.heldout import (
    AUTO_BANDWIDTHS,
    VALIDATION_DRAWS,
    HeldoutPoint,
    check_bandwidth,
    check_heldout,
    check_same_kind,
    choose_bandwidth,
    heldout_losses,
    smoothed_posterior_mean,
)
from lossfloor.floor.nested import (
    CONVERGED_DRIFT,
    MEMORISED,
    R_MAX,
    extrapolate,
    floor,
    size_verdict,
    subset_sizes,
)
from lossfloor.floor.reading import READINGS, check_floor, read_heldout, reading, with_heldout
from lossfloor.floor.result import CSV_COLUMNS, FORMAT, Floor, FloorPoint, SizePoint

__all__ = [
    "AUTO_BANDWIDTHS",
    "CONVERGED_DRIFT",
    "CSV_COLUMNS",
    "FORMAT",
    "MEMORISED",
    "R_MAX",
    "READINGS",
    "VALIDATION_DRAWS",
    "Floor",
    "FloorPoint",
    "HeldoutPoint",
    "SizePoint",
    "check_bandwidth",
    "check_floor",
    "check_heldout",
    "check_same_kind",
    "choose_bandwidth",
    "extrapolate",
    "floor",
    "heldout_losses",
    "read_heldout",
    "reading",
    "size_verdict",
    "smoothed_posterior_mean",
    "subset_sizes",
    "with_heldout",
]

"""J* read from an estimate instead of computed: ``optimal_from_curve`` takes (J*, s.e., the
dtype of its draws) at each σ of a diagnosis from a curve of the exact posterior on the same
draws, refusing any other (other data, another estimator, other draws)."""

from __future__ import annotations

from collections.abc import Sequence

from lossfloor.data import Dataset
from lossfloor.diagnosis.result import DRAWS
from lossfloor.errors import ParameterError
from lossfloor.optimal import Curve
from lossfloor.optimal.capabilities import having, listed
from lossfloor.optimal.estimators import declared

#: J* at one σ read from an estimate: (J*, its standard error, the dtype of its draws or None).
Known = tuple[float, float, str | None]


def optimal_from_curve(
    curve: Curve,
    dataset: Dataset,
    sigmas: Sequence[float],
    outer: int,
    seed: int,
    conditional: bool,
) -> list[Known]:
    """(J*, s.e., the dtype of its draws) at each σ from an estimate on the draws a diagnosis
    uses: the curve's direct form, the mean of the same per-sample values ‖μ(x0 + σε) − x0‖²/D
    diagnose computes (tilted draws: of control_variate(w·v, w), as for the model's loss).
    Refused (parameter ``curve``) unless it is an estimate of this data (sha256, conditional)
    by the exact posterior (an estimator whose ``capabilities.exact``: ``full``), on the same
    draws (M, seed; fixed sizes, the data's own sources), with every σ."""
    _check_curve(curve, dataset, outer, seed, conditional)
    out = []
    for sigma in sigmas:
        point = curve.point_at(sigma)
        if point is None or point.direct is None or point.direct_stderr is None:
            grid = ", ".join(f"{s:.4g}" for s in curve.sigmas)
            raise ParameterError(
                "curve", None, f"the estimate has no J* at σ = {sigma:.6g} (its σ: {grid})"
            )
        out.append((point.direct, point.direct_stderr, point.dtype))
    return out


def _check_curve(curve: Curve, dataset: Dataset, outer: int, seed: int, conditional: bool) -> None:
    """Refuse a curve that is not of this data, not by an exact estimator or not on the same
    draws (``optimal_from_curve``)."""
    info = curve.dataset or {}
    if info.get("sha256") != dataset.sha256:
        reason = "the estimate is of other data (its dataset sha256 differs from this data's)"
        raise ParameterError("curve", None, reason)
    if bool(info.get("conditional")) != conditional:
        kind = "a conditional" if conditional else "an unconditional"
        raise ParameterError("curve", None, f"the model is {kind} one; the estimate is not")
    name = (curve.estimator or {}).get("name")
    exact = having(declared(), lambda caps: caps.exact)  # per-draw values that pair: full
    if name not in exact:
        reason = f"the estimate is a {name} estimate; the gap is to the exact posterior "
        raise ParameterError("curve", None, reason + f"({listed(exact)})")
    if curve.draws not in (None, *DRAWS):
        raise ParameterError("curve", None, f"the estimate used unknown draws {curve.draws!r}")
    if curve.target_rse is not None or curve.sources is not None:
        what = "adaptive sizes (--target-rse)" if curve.sources is None else "held-out sources"
        reason = f"the estimate used {what}: its σ do not share one set of draws to pair with"
        raise ParameterError("curve", None, reason)
    if (curve.outer, curve.seed) != (outer, seed):
        reason = (
            f"the estimate holds J* on M = {curve.outer}, seed {curve.seed} draws, not M = "
            f"{outer}, seed {seed}; the gap pairs the model with J* on the same draws"
        )
        raise ParameterError("curve", None, reason)

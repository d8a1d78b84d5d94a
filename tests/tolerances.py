"""Tolerances from a quantity's own error bound, for comparisons that cross reduction orders,
CPUs (vectorised kernels: ``ATEN_CPU_CAPABILITY``), process counts or files written elsewhere.
Bitwise comparisons are kept for two computations of one run on one machine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lossfloor.optimal.draws import TILT_SHARE
from lossfloor.optimal.kernel import logit_error_bound
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.precision import closed_rounding

#: float64 machine epsilon, 2u (one ulp of 1).
EPS64 = float(np.finfo(np.float64).eps)


def sum_rtol(terms: int, per_term_ulps: int = 0, eps: float = EPS64) -> float:
    """How far, relatively, two sums of ``terms`` non-negative terms can differ when they add
    in other orders (Higham's γ_n ≈ n·u each) and each term is off by up to ``per_term_ulps``
    ulps (e.g. exp, log of one CPU's vectorised kernels against another's; a convolution's
    sum): 2·(terms + per_term_ulps)·u = (terms + per_term_ulps)·ε, ε = 2u of the dtype."""
    return (terms + per_term_ulps) * eps


def pool_of(points: Path, dtype: str) -> Pool:
    """The pool (centred rows, A, max‖x‖²) of the points in an .npy file, in ``dtype``."""
    x = torch.from_numpy(np.load(points)).double()
    return Pool.from_data(x, getattr(torch, dtype), "cpu")


def rounding_bound(pool: Pool, sigma: float, draws: str | None) -> float:
    """How far a per-σ value (per element) of two estimates of the same draws that sum in
    other orders (processes, chunks, tiles, CPUs) can differ: twice one run's rounding bound.

    Per draw, the closed form (A − ‖μ‖²)/D is off by at most ``precision.closed_rounding`` (μ's
    error from the logits' rounding and its own; ‖μ‖ ≤ R = max‖x‖, μ being a mean of the
    centred rows), the direct form ‖x0 − μ‖²/D (‖x0 − μ‖ ≤ 2R) by at most twice that, both
    times the likelihood ratio w ≤ 1/(1 − TILT_SHARE) of tilted draws; A itself, a float64
    mean of N squared norms summed in another order, by N·u·A. Means, standard errors and the
    combination a·closed + (1−a)·direct move by no more than their per-draw values do. (In
    float32 the bound is ~1e5× the differences measured on 300 points in 64 dims, ~1e-3 at
    σ = 0.5, above J* itself: comparisons that should be tight run in float64.)"""
    dtype = pool.x.dtype
    at_r = torch.tensor([(pool.a - pool.max_sq) / pool.dim], dtype=torch.float64)  # ‖μ‖ = R
    per_draw = 2 * float(closed_rounding(pool, sigma, dtype, at_r)[0])
    per_draw /= 1 - TILT_SHARE if draws == "tilted" else 1
    per_draw += pool.n * EPS64 * pool.a / pool.dim
    return 2 * per_draw


def assert_same_point(p2: dict[str, Any], p1: dict[str, Any], tol: float, outer: int) -> None:
    """Two curve points (``CurvePoint.to_json()``) of the same draws agree within ``tol``
    (``rounding_bound``) per value, and their derived statistics within what it implies."""
    for key in ("optimal_loss", "stderr", "closed", "closed_stderr", "direct", "direct_stderr"):
        assert p2[key] == pytest.approx(p1[key], rel=0, abs=tol), key
    if p1.get("optimal_loss_target") is not None:
        factor = p1["optimal_loss_target"] / p1["optimal_loss"]  # the target's loss factor
        target = pytest.approx(p1["optimal_loss_target"], rel=0, abs=factor * tol)
        assert p2["optimal_loss_target"] == target
    # a and the ESS are ratios of second moments of the per-draw values: a perturbation of
    # each value by tol moves them by ≤ 4·tol over the values' spread (√M·stderr) or mean
    spread = math.sqrt(outer) * min(p1["closed_stderr"], p1["direct_stderr"])
    a2, a1 = p2["combined_weight_closed"], p1["combined_weight_closed"]
    assert a2 == pytest.approx(a1, rel=0, abs=4 * tol / spread)
    assert p2["ess"] == pytest.approx(p1["ess"], rel=4 * tol / p1["direct"])


def posterior_mean_atol(keys: torch.Tensor, sigma: float, dtype: torch.dtype) -> float:
    """A bound on the rounding error of μ = Σ p(n|q)·x_n computed by the kernel in ``dtype``:
    the weights' relative error δ (``kernel.logit_error_bound``) moves μ by ≤ 4δ·R, and μ's own
    rounding by 2u·R (R = max‖x_n‖), as ``precision.closed_rounding`` takes it."""
    max_sq = float(keys.double().pow(2).sum(dim=1).max())
    r = math.sqrt(max_sq)
    delta = logit_error_bound(max_sq, keys.shape[1], sigma, dtype)
    return 4 * delta * r + torch.finfo(dtype).eps * r

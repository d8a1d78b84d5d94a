"""Tolerances from a quantity's own error bound, for comparisons that cross reduction orders,
CPUs (vectorised kernels: ``ATEN_CPU_CAPABILITY``), process counts or files written elsewhere.
Bitwise comparisons are kept for two computations of one run on one machine."""

from __future__ import annotations

import numpy as np

#: float64 machine epsilon, 2u (one ulp of 1).
EPS64 = float(np.finfo(np.float64).eps)


def sum_rtol(terms: int, per_term_ulps: int = 0) -> float:
    """How far, relatively, two float64 sums of ``terms`` non-negative terms can differ when
    they add in other orders (Higham's γ_n ≈ n·u each) and each term is off by up to
    ``per_term_ulps`` ulps (e.g. exp, log of one CPU's vectorised kernels against another's):
    2·(terms + per_term_ulps)·u ≤ (terms + per_term_ulps)·ε."""
    return (terms + per_term_ulps) * EPS64

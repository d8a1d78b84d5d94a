"""The one tolerance within which two noise levels σ are one.

A σ parsed from a log-spaced grid string (``0.05:20:6``) or written to JSON and read back can
be off by a few ulps (100.00000000000013 for 100); every comparison that asks whether a σ is
a given one (a saved point, a curve's point, a row of RUNS.csv) or lies at a grid's end uses
``SIGMA_RTOL``, so they all agree.
"""

from __future__ import annotations

import math

#: Relative tolerance within which two σ are one: ulps of a parsed or computed grid, far
#: below any difference of σ that changes J* (a grid of two σ this close is refused).
SIGMA_RTOL = 1e-9


def same_sigma(a: float, b: float) -> bool:
    """Whether ``a`` and ``b`` are one σ: |a − b| ≤ SIGMA_RTOL·max(|a|, |b|)."""
    return math.isclose(a, b, rel_tol=SIGMA_RTOL)

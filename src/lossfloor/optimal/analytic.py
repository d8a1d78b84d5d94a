"""Closed forms of J*(σ) per element, used as references by tests and benchmarks."""

from __future__ import annotations

import numpy as np


def two_point_optimal_loss(r: float, dim: int, sigma: float, nodes: int = 200) -> float:
    """Dataset {+a, −a}, ‖a‖ = r, in D dims: μ(x) = a·tanh(⟨x, a⟩/σ²), so

    J*(σ) per element = r²/D·(1 − E_z tanh²(r²/σ² + (r/σ)·z)),  z ~ N(0, 1),

    with the expectation by Gauss–Hermite quadrature (``nodes`` points).
    """
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    t = np.tanh(r * r / (sigma * sigma) + (r / sigma) * z)
    return float(r * r / dim * (1.0 - np.sum(w * t * t) / np.sqrt(2 * np.pi)))


def gaussian_optimal_loss(variances: np.ndarray, sigma: float) -> float:
    """Data N(m, diag v): μ(x) = m + v/(v+σ²)·(x − m), so J*(σ) per element = mean(v·σ²/(v+σ²))."""
    v = np.asarray(variances, dtype=np.float64)
    return float(np.mean(v * sigma**2 / (v + sigma**2)))

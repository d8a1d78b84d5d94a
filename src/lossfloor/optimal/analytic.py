"""Closed forms of J*(σ) per element, used as references by tests and benchmarks."""

from __future__ import annotations

import math

import numpy as np


def two_point_optimal_loss(r: float, dim: int, sigma: float) -> float:
    """Dataset {+a, −a}, ‖a‖ = r, in D dims: μ(x) = a·tanh(⟨x, a⟩/σ²), so

    J*(σ) per element = r²/D·E_z sech²(m + s·z),  m = r²/σ², s = r/σ, z ~ N(0, 1),

    by adaptive quadrature over y = m + s·z of sech²(y)·φ((y − m)/s)/s, scaled by its maximum,
    over ±60 peak widths min(1, s) (sech² written as 4e^{−2|y|}/(1 + e^{−2|y|})², never as
    1 − tanh²): accurate to ~1e-10 relative from J* ~ 1e-300 to the data variance.
    """
    from scipy.integrate import quad
    from scipy.optimize import minimize_scalar

    m, s = r * r / (sigma * sigma), r / sigma

    def log_f(y: float) -> float:
        t = abs(y)
        return (
            math.log(4.0) - 2 * t - 2 * math.log1p(math.exp(-2 * t))
            - 0.5 * ((y - m) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
        )  # fmt: skip

    peak = minimize_scalar(lambda y: -log_f(y), bounds=(min(0.0, m), max(1.0, m)),
                           method="bounded", options={"xatol": 1e-10})  # fmt: skip
    y0 = float(peak.x)
    top = log_f(y0)
    width = min(1.0, s)  # of the peak: sech² decays like e^{−2|y|}, the Gaussian over s
    lo, hi = y0 - 60 * width, y0 + 60 * width
    pts = [p for p in (y0 - 3 * width, y0, y0 + 3 * width) if lo < p < hi]
    value, _ = quad(lambda y: math.exp(log_f(y) - top), lo, hi, points=pts, limit=500,
                    epsabs=0.0, epsrel=1e-11)  # fmt: skip
    log_j = math.log(r * r / dim) + top + math.log(value)
    return math.exp(log_j) if log_j > -745 else 0.0


def line_optimal_loss(positions: np.ndarray, dim: int, sigma: float) -> float:
    """Points t_n·u on a line (u a unit vector in D dims): the posterior depends on x_t only
    through y = ⟨x_t, u⟩ = t_src + σz, so

        J*(σ) per element = (1/D)·∫ p(y)·Var(t | y) dy,   p(y) = (1/N)Σ_n φ((y − t_n)/σ)/σ,

    Var(t | y) = Σ_n π_n(y)·(t_n − μ(y))², π = softmax(−(y − t_n)²/2σ²), by adaptive quadrature
    with breakpoints at the points and their midpoints (where Var(t | y) peaks)."""
    from scipy.integrate import quad

    t = np.sort(np.asarray(positions, dtype=np.float64))

    def integrand(y: float) -> float:
        logits = -((y - t) ** 2) / (2 * sigma * sigma)
        top = logits.max()
        k = np.exp(logits - top)
        pi = k / k.sum()
        mu = float(pi @ t)
        var = float(pi @ (t - mu) ** 2)
        density = math.exp(top) * k.sum() / (t.size * sigma * math.sqrt(2 * math.pi))
        return density * var

    mids = (t[1:] + t[:-1]) / 2
    cuts = np.unique(np.concatenate([t, mids]))
    edges = np.concatenate([[t[0] - 40 * sigma], cuts, [t[-1] + 40 * sigma]])
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        total += quad(integrand, a, b, limit=200, epsabs=0.0, epsrel=1e-10)[0]
    return total / dim


def gaussian_optimal_loss(variances: np.ndarray, sigma: float) -> float:
    """Data N(m, diag v): μ(x) = m + v/(v+σ²)·(x − m), so J*(σ) per element = mean(v·σ²/(v+σ²))."""
    v = np.asarray(variances, dtype=np.float64)
    return float(np.mean(v * sigma**2 / (v + sigma**2)))

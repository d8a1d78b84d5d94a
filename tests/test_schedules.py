"""Noise schedules p(σ), w(σ) and the total optimal loss E_p[w·J*] over a curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from lossfloor.errors import UserError
from lossfloor.optimal import total_optimal_loss
from lossfloor.optimal.analytic import gaussian_optimal_loss
from lossfloor.schedules import SCHEDULE_NAMES, get_schedule


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_density_of_log_sigma_integrates_to_one_and_matches_samples(name):
    s = get_schedule(name)
    lo, hi = s.support()

    def q(u: float) -> float:
        return float(s.density_ln_sigma(math.exp(u)))

    mass, _ = integrate.quad(q, math.log(lo), math.log(hi), limit=400, points=[0.0])
    assert mass == pytest.approx(1.0, abs=2e-6)
    # the sampler draws from the same density: compare P(σ < 1) both ways
    draws = s.sample(200_000, torch.Generator().manual_seed(0))
    below, _ = integrate.quad(q, math.log(lo), 0.0,
                              limit=400)  # fmt: skip
    assert float((draws < 1).double().mean()) == pytest.approx(below, abs=0.005)


def test_weights_are_the_objectives_x0_units():
    sig = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    edm = get_schedule("edm").weight(sig)
    torch.testing.assert_close(edm, (sig**2 + 0.25) / (0.5 * sig) ** 2)  # λ(σ) = 1/c_out²
    torch.testing.assert_close(get_schedule("vp").weight(sig), 1 / sig**2)  # ε loss
    t = sig / (1 + sig)
    torch.testing.assert_close(get_schedule("fm").weight(sig), 1 / t**2)  # rectified-flow v


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_total_matches_quadrature_of_a_closed_form_curve(name):
    """Gaussian data (v = 0.3): J*(σ) = vσ²/(v+σ²). The total over a 60-point grid against
    scipy's adaptive quadrature of the exact integrand; the stated quadrature error and the
    tail must cover the difference."""
    s = get_schedule(name)
    lo, hi = s.support()
    sig = np.exp(np.linspace(math.log(max(lo, 1e-4)), math.log(min(hi, 1e3)), 60))
    j = np.array([gaussian_optimal_loss(np.array([0.3]), x) for x in sig])
    got = total_optimal_loss(sig, j, np.zeros_like(j), s)

    def f(u: float) -> float:
        x = math.exp(u)
        return float(s.density_ln_sigma(x) * s.weight(x)) * gaussian_optimal_loss(
            np.array([0.3]), x
        )

    exact, _ = integrate.quad(f, math.log(lo), math.log(hi), limit=500, points=[0.0])
    err = abs(got["optimal_loss"] - exact)
    assert err <= 3 * got["quadrature_error"] + abs(got["tail"]) + 1e-6 * exact, (got, exact)
    assert err < 0.01 * exact


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="unknown schedule"):
        get_schedule("cosine-warp")

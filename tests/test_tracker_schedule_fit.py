"""schedules/fit.py: the lognormal closest to a schedule's density (EDM's P_mean/P_std, SD3's
logit-normal m, s), draws with weights, and a diffusers scheduler's timesteps drawn by it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from lossfloor.cli import main
from lossfloor.schedules import EDMSchedule, OptimalLossSchedule
from lossfloor.schedules.fit import (
    _entropy,
    density_table,
    fit_lognormal,
    timestep_probabilities,
)

FMNIST = Path(__file__).resolve().parents[1] / "docs" / "results" / "fmnist-full.json"


def wide_curve() -> dict[str, list[float]]:
    """A J* table on [1e-4, 1e4] (only its coverage matters under the lognormal density)."""
    s = np.exp(np.linspace(math.log(1e-4), math.log(1e4), 33))
    return {"sigma": s.tolist(), "value": (0.2 * s**2 / (1 + s**2)).tolist()}


def test_fit_recovers_an_exactly_lognormal_density():
    """EDM2's density, ln σ ~ N(−0.4, 1.0²) (tabulated over its ±7 s.d. support): P_mean,
    P_std within 1e-3 (the issue's bound; the grid's error is ~1e-8), KL ≈ 0."""
    fit = fit_lognormal(EDMSchedule(p_mean=-0.4, p_std=1.0))
    assert fit.p_mean == pytest.approx(-0.4, abs=1e-3)
    assert fit.p_std == pytest.approx(1.0, abs=1e-3)
    assert fit.kl < 1e-6


def test_fit_of_a_truncated_lognormal_gives_the_truncated_moments():
    """The optimal schedule's lognormal density on [σ_min, σ_max] is a normal in ln σ truncated
    there: mean and s.d. are scipy's truncnorm's (closed form) to the table's precision
    (2048 cells, exact moments of the piecewise-linear density: O(h²) ≈ 1e-6)."""
    sched = OptimalLossSchedule(
        optimal_loss=wide_curve(), density="lognormal", p_mean=-1.2, p_std=1.2,
        sigma_min=0.02, sigma_max=20.0,
    )  # fmt: skip
    a, b = [(math.log(x) + 1.2) / 1.2 for x in (0.02, 20.0)]
    ref = stats.truncnorm(a, b, loc=-1.2, scale=1.2)
    fit = fit_lognormal(sched)
    assert fit.p_mean == pytest.approx(ref.mean(), abs=1e-5)
    assert fit.p_std == pytest.approx(ref.std(), abs=1e-5)
    # KL(truncated‖normal) = −ln Z, Z the mass kept, for the untruncated normal; the fit's
    # normal is the moment-matched one, closer still: 0 < KL ≤ −ln Z
    z = stats.norm.cdf(b) - stats.norm.cdf(a)
    assert 0 < fit.kl <= -math.log(z) + 1e-6


def test_the_fit_minimises_kl_over_lognormals():
    """Brute force: KL(q‖N(m, s²)) by quadrature on the table is smallest at the fit's (m, s)
    among its neighbours (±0.05 in m and s)."""
    u_grid = np.exp(np.linspace(math.log(0.002), math.log(80.0), 31))
    j = 0.2 * u_grid**2 / (0.3 + u_grid**2) * (1 + 0.3 * np.sin(np.log(u_grid)))
    sched = OptimalLossSchedule(optimal_loss={"sigma": u_grid.tolist(), "value": j.tolist()})
    u, q = density_table(sched)
    h = _entropy(u, q)
    fit = fit_lognormal(sched)

    def kl(m: float, s: float) -> float:
        log_n = -0.5 * ((u - m) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
        return -h - float(
            np.sum(0.5 * np.diff(u) * (q * log_n)[1:] + 0.5 * np.diff(u) * (q * log_n)[:-1])
        )

    best = kl(fit.p_mean, fit.p_std)
    assert best == pytest.approx(fit.kl, abs=1e-6)
    for dm, ds in [(0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)]:
        assert kl(fit.p_mean + dm, fit.p_std + ds) > best


def test_shares_below_and_above_sigma_star_are_the_densities_masses():
    """The lognormal's shares are Φ; the density's are its integral (here the EDM density
    itself, so both equal Φ((ln σ* − m)/s))."""
    fit = fit_lognormal(EDMSchedule(p_mean=-1.2, p_std=1.2), sigma_star=1.0)
    below = stats.norm.cdf((0 + 1.2) / 1.2)
    above = stats.norm.sf((math.log(10) + 1.2) / 1.2)
    assert fit.below_star == pytest.approx((below, below), abs=1e-6)
    assert fit.above_ten_star == pytest.approx((above, above), abs=1e-6)


def test_sample_with_weights_draws_sigma_and_its_weight():
    sched = EDMSchedule()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sigma, weight = sched.sample_with_weights(100, g1)
    assert torch.equal(sigma, sched.sample(100, g2))
    assert torch.equal(weight, sched.weight(sigma))


def test_timesteps_carry_the_density_and_weights_in_prediction_units():
    """Σ_k P_k·weight_k·a²_k·f(σ̃_k) (the discrete objective's mean for an x0 loss f, a²_k the ε
    factor 1/σ̃_k²) equals ∫ q(u)·w(e^u)·f(e^u) du, to the discretisation of 1000 timesteps
    (cells ≤ 0.4 in ln σ̃ at the ends, where q·w·f is tiny: 1e-3 relative); and 40,000
    draws follow P within 5 binomial s.e. per group of 100 timesteps."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    sched = EDMSchedule(p_mean=-0.4, p_std=1.0)
    ac = scheduler.alphas_cumprod.double()
    sig = ((1 - ac) / ac).sqrt()
    p = timestep_probabilities(sched, scheduler)
    k, weight = sched.sample_timesteps(40_000, scheduler, torch.Generator().manual_seed(0))
    assert k.dtype == torch.int64 and weight.shape == (40_000,)
    assert torch.allclose(weight, sched.weight(sig[k]) * sig[k] ** 2, rtol=1e-9)

    def f(s):
        return s**2 / (1 + s**2)

    discrete = float((p * sched.weight(sig) * f(sig)).sum())
    u = np.linspace(math.log(sig[0]), math.log(sig[-1]), 200_001)
    s = torch.from_numpy(np.exp(u))
    integrand = (sched.density_ln_sigma(s) * sched.weight(s) * f(s)).numpy()
    continuous = float(np.trapezoid(integrand, u))
    assert discrete == pytest.approx(continuous, rel=1e-3)
    counts = torch.bincount(k // 100, minlength=10).double()
    expected = p.view(10, 100).sum(1) * 40_000
    se = (expected * (1 - expected / 40_000)).sqrt().clamp_min(1.0)
    assert ((counts - expected).abs() <= 5 * se).all()


def test_schedule_fit_writes_and_prints_the_lognormal(tmp_path, capsys):
    """``lossfloor schedule --fit`` on the Fashion-MNIST curve in docs: P_mean, P_std printed
    and written (JSON key fit), the same numbers as fit_lognormal; without --fit, no key."""
    out = tmp_path / "s.json"
    assert main(["schedule", "--curve", str(FMNIST), "--out", str(out),
                 "--fit"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    fit = json.loads(out.read_text())["fit"]
    assert f"P_mean = {fit['P_mean']:.4f}, P_std = {fit['P_std']:.4f}" in printed
    assert fit["logit_normal"] == {"m": fit["P_mean"], "s": fit["P_std"]}
    assert set(fit["share_below_sigma_star"]) == {"optimal", "lognormal"}
    plain = tmp_path / "p.json"
    assert main(["schedule", "--curve", str(FMNIST), "--out", str(plain)]) == 0
    assert "fit" not in json.loads(plain.read_text())

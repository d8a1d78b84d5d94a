"""Honest values where J* comes from rare events (issue 8): never negative, a convex
combination of the two forms, and an effective-sample-size flag where the draws miss the events."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lossfloor.cli import main
from lossfloor.optimal import estimate_curve, make_estimator
from lossfloor.optimal.analytic import two_point_optimal_loss
from lossfloor.optimal.estimators import PerSample
from lossfloor.optimal.moments import MIN_EFFECTIVE_DRAWS, Moments, effective_draws
from lossfloor.optimal.pools import Pool

#: The issue's two-point set: ±a in 16 dims, ‖a‖ = r with J*(0.6) = 1.07e-4 per element.
DIM, R = 16, 2.2128884383056144


def two_points() -> torch.Tensor:
    a = torch.full((DIM,), R / math.sqrt(DIM), dtype=torch.float64)
    return torch.stack([a, -a])


@pytest.mark.numerics
def test_the_issue_case_has_the_exact_value_it_names():
    """1.07e-4 came from Gauss–Hermite quadrature of 1 − tanh²; the sech² quadrature gives
    1.069857e-4."""
    assert two_point_optimal_loss(R, DIM, 0.6) == pytest.approx(1.07e-4, rel=2e-4)


def test_the_combination_weight_stays_in_0_1_and_the_value_between_the_forms():
    """closed = 3·direct + noise: the unclipped min-variance weight is (V_d − C)/(V_c + V_d − 2C)
    ≈ −0.5, an extrapolation; clipped, it is 0 and the combination is the direct form."""
    g = torch.Generator().manual_seed(0)
    d = torch.rand(5000, generator=g, dtype=torch.float64)
    c = 3 * d + 0.01 * torch.randn(5000, generator=g, dtype=torch.float64) - 2.0
    mom = Moments.from_samples(PerSample(closed=c, direct=d))
    vc, vd = c.var().item(), d.var().item()
    cov = torch.cov(torch.stack([c, d]))[0, 1].item()
    assert (vd - cov) / (vc + vd - 2 * cov) < -0.4  # what the unclipped rule would use
    assert mom.weight_closed == 0.0
    assert mom.combined == pytest.approx(mom.direct, rel=1e-12)


def test_effective_draws_counts_the_draws_that_carry_the_mean():
    assert effective_draws(torch.ones(100)) == pytest.approx(100)
    assert effective_draws(torch.tensor([0.0] * 99 + [5.0])) == pytest.approx(1)
    assert effective_draws(torch.tensor([0.0] * 10 + [2.0] * 10)) == pytest.approx(10)
    assert effective_draws(torch.zeros(7)) == 0.0


def test_the_issue_case_is_not_negative_and_is_flagged_unresolved():
    """Plain draws, --outer 8000 --seed 7, σ = 0.6: ~1 draw carries J*; before the fix the
    combined value was −3.3e-5 ± 1.8e-5 (weight −1.02) against the exact 1.07e-4."""
    curve = estimate_curve(two_points(), [0.6, 2.0], make_estimator("full", 2), outer=8000,
                           seed=7, draws="plain", progress=False)  # fmt: skip
    rare, easy = curve.points
    assert rare.optimal_loss >= 0
    assert 0.0 <= rare.combined_weight_closed <= 1.0
    assert rare.ess < 5 and rare.resolved is False
    assert easy.ess > 1000 and easy.resolved is True
    assert abs(easy.optimal_loss - two_point_optimal_loss(R, DIM, 2.0)) < 3 * easy.stderr


def test_the_cli_warns_where_the_draws_do_not_resolve_j(tmp_path, capsys):
    path = tmp_path / "two.npz"
    np.savez(path, x=two_points().numpy())
    out = tmp_path / "curve.json"
    rc = main(["estimate", "--data", str(path), "--sigmas", "0.6,2", "--outer", "8000",
               "--seed", "7", "--draws", "plain", "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [
        line
        for line in err.splitlines()
        if line.startswith("lossfloor: warning: J* is not resolved")
    ]
    assert len(lines) == 1 and "σ = 0.6 (ESS" in lines[0] and ", 2 (" not in lines[0]
    assert f"fewer than {MIN_EFFECTIVE_DRAWS:g}" in lines[0] and "--draws tilted" in lines[0]


# --- the references ----------------------------------------------------------------------


def test_the_two_point_and_line_quadratures_agree_with_each_other_and_a_direct_integral():
    """Three independent routes: sech² over y = m + s·z (scaled by its peak), the line's
    posterior variance over y with the points as breakpoints, and 1 − tanh² over z (where it
    does not cancel: J* ≫ 1e-16)."""
    from scipy.integrate import quad

    from lossfloor.optimal.analytic import line_optimal_loss

    for sigma in (0.1, 0.3, 0.6, 2.0, 50.0):
        tp = two_point_optimal_loss(R, DIM, sigma)
        line = line_optimal_loss(np.array([-R, R]), DIM, sigma)
        assert line == pytest.approx(tp, rel=1e-7)
        if tp > 1e-10:
            m, s = R * R / sigma**2, R / sigma

            def f(z, m=m, s=s):
                return (1 - math.tanh(m + s * z) ** 2) * math.exp(-z * z / 2)

            direct = quad(f, -40, 40, points=[-m / s], limit=400, epsabs=0, epsrel=1e-12)[0]
            assert tp == pytest.approx(R * R / DIM * direct / math.sqrt(2 * math.pi), rel=1e-7)


# --- tilted draws --------------------------------------------------------------------------


@pytest.mark.numerics
def test_the_tilted_weight_is_the_ratio_of_the_normal_to_the_mixture_density():
    """w(ε) = φ(ε)/q(ε) with q the defensive mixture written out by scipy's densities."""
    from scipy.stats import multivariate_normal

    from lossfloor.optimal.draws import TILT_SHARE, TiltBlock, tilted_noise
    from lossfloor.optimal.neighbours import nearest_neighbours

    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    pool = Pool.from_data(x, torch.float64, "cpu")
    table = nearest_neighbours(pool, torch.arange(12), 11)
    src = torch.randint(12, (400,), generator=g)
    plain = torch.randn(400, 3, generator=g, dtype=torch.float64)
    sigma = 0.4
    eps, w = tilted_noise(TiltBlock.build(5, 0, plain, pool.x, src, table), plain, pool.x, src,
                          sigma)  # fmt: skip
    assert bool((w > 0).all() and (w <= 1 / (1 - TILT_SHARE) + 1e-12).all())
    shifted = ~torch.isclose(eps, plain).all(dim=1)
    assert 0.4 < shifted.double().mean().item() < 0.6  # about α of the draws are tilted
    for i in range(0, 400, 37):
        nb = table[src[i], 1:9]
        delta = ((pool.x[nb] - pool.x[src[i]]) / (2 * sigma)).numpy()
        beta = np.exp(-0.5 * (delta**2).sum(1))
        beta /= beta.sum()
        e = eps[i].numpy()
        phi = multivariate_normal(np.zeros(3)).pdf(e)
        q = (1 - TILT_SHARE) * phi + TILT_SHARE * sum(
            b * multivariate_normal(d).pdf(e) for b, d in zip(beta, delta, strict=True)
        )
        assert w[i].item() == pytest.approx(phi / q, rel=1e-10)


@pytest.mark.slow
def test_the_issue_case_with_the_default_draws_is_resolved_and_right():
    """Default (tilted) draws, --outer 8000 --seed 7: resolved, within 3 standard errors of the
    exact value and within 10% at every σ from 0.3 (J* ~ 1e-13) to 5."""
    sigmas = [0.3, 0.45, 0.6, 1.0, 5.0]
    curve = estimate_curve(two_points(), sigmas, make_estimator("full", 2), outer=8000, seed=7,
                           progress=False)  # fmt: skip
    assert curve.draws == "tilted"
    for p in curve.points:
        exact = two_point_optimal_loss(R, DIM, p.sigma)
        assert p.resolved and p.ess > 100, p
        assert abs(p.optimal_loss - exact) < 3 * p.stderr, (p, exact)
        assert abs(p.optimal_loss / exact - 1) < 0.1, (p, exact)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["full", "gram"])
@pytest.mark.parametrize("name", ["two-point", "line"])
def test_the_95_percent_interval_covers_the_exact_value(name, estimator):
    """50 seeds, M = 2000 (docs/benchmarks.md: 200 seeds at M = 8000): coverage ≥ 86% at
    every σ (a 95% interval: 47.5 of 50 expected), and the mean error in standard errors
    |z̄| < 0.5 (no bias the interval hides). The line has unequal gaps 1, 0.5, 2, 0.5. gram:
    tilted draws in its grid sweep (``sweep._grid_values``), its default inner sample."""
    from lossfloor.optimal.analytic import line_optimal_loss

    if name == "two-point":
        data, sigmas = two_points(), [0.3, 0.45, 0.6, 1.0]
        exact = [two_point_optimal_loss(R, DIM, s) for s in sigmas]
    else:
        t = np.array([0.0, 1.0, 1.5, 3.5, 4.0])
        data = torch.from_numpy(t)[:, None] * torch.ones(8, dtype=torch.float64) / math.sqrt(8)
        sigmas = [0.05, 0.1, 0.2, 0.5]
        exact = [line_optimal_loss(t, 8, s) for s in sigmas]
    est = make_estimator(estimator, data.shape[0])
    z = []
    for seed in range(50):
        curve = estimate_curve(data, sigmas, est, outer=2000, seed=seed, draws="tilted",
                               progress=False)  # fmt: skip
        z.append((curve.values - exact) / curve.stderrs)
    z = np.array(z)
    cover = (np.abs(z) < 1.96).mean(axis=0)
    assert np.all(cover >= 0.86), cover
    assert np.all(np.abs(z.mean(axis=0)) < 0.5), z.mean(axis=0)


def test_a_negative_closed_form_is_recorded_with_its_weight_and_rounding_bound_never_as_j():
    """Tilted draws where J* ≈ 0: the closed form's mean may be negative (an unbiased mean of
    per-draw values); the point keeps it, with the weight the combination gave it and its
    rounding bound, while optimal_loss stays ≥ 0."""
    from lossfloor.optimal.moments import curve_point

    g = torch.Generator().manual_seed(0)
    direct = torch.rand(4000, generator=g, dtype=torch.float64) * 1e-6
    closed = direct - 4e-3 + 1e-3 * torch.randn(4000, generator=g, dtype=torch.float64)
    samples = PerSample(closed=closed, direct=direct, weight=torch.ones(4000), closed_error=2e-3)
    p = curve_point(0.2, samples, torch.float32, 1.0, form="combined", draws="tilted")
    assert p.closed < 0 and p.optimal_loss >= 0
    assert p.closed_rounding == 2e-3 and p.combined_weight_closed == 0.0  # left out: rounding
    assert p.to_json()["closed_rounding"] == 2e-3

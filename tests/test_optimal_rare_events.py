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
from lossfloor.optimal.outer import MIN_EFFECTIVE_DRAWS, Moments, effective_draws

#: The issue's two-point set: ±a in 16 dims, ‖a‖ = r with J*(0.6) = 1.07e-4 per element.
DIM, R = 16, 2.2128884383056144


def two_points() -> torch.Tensor:
    a = torch.full((DIM,), R / math.sqrt(DIM), dtype=torch.float64)
    return torch.stack([a, -a])


def test_the_issue_case_has_the_exact_value_it_names():
    assert two_point_optimal_loss(R, DIM, 0.6) == pytest.approx(1.07e-4, rel=1e-9)


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
                           seed=7, progress=False)  # fmt: skip
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
               "--seed", "7", "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("warning: J* is not resolved")]
    assert len(lines) == 1 and "σ = 0.6 (ESS" in lines[0] and ", 2 (" not in lines[0]
    assert f"fewer than {MIN_EFFECTIVE_DRAWS:g}" in lines[0]

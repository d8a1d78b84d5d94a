"""The upper bound on J* from the neighbour index (optimal/bound.py): above the exact J* of the
two-point set, collinear points and a random planar set at every σ, equal to its closed form on
two points, and what estimates and the CLI report with it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import log_ndtr, ndtr

from lossfloor.cli import main
from lossfloor.optimal import estimate_curve, make_estimator
from lossfloor.optimal.analytic import line_optimal_loss, two_point_optimal_loss
from lossfloor.optimal.bound import MEMORISED_SHARE, NearestPointBound, log_pair_term, u_star
from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.neighbours import neighbour_tables
from lossfloor.optimal.pool_cache import make_pools

SIGMAS = np.geomspace(0.005, 50, 25)


def bound_of(x: torch.Tensor, k: int, dtype=torch.float64, labels=None) -> NearestPointBound:
    """The bound as an estimate builds it: every point a source, the index with k neighbours."""
    plan = OuterPlan.build(x, labels, len(x), 0, labels is not None)
    pools = make_pools(plan, dtype, torch.device("cpu"))
    return NearestPointBound.from_index(plan, pools, neighbour_tables(plan, pools, k))


def test_u_star_maximises_u2_q():
    """u* solves 2Q(u) = u·φ(u) and u²Q(u) is below its value on a fine grid."""
    u = u_star()
    assert 2 * ndtr(-u) == pytest.approx(u * math.exp(-u * u / 2) / math.sqrt(2 * math.pi))
    grid = np.linspace(0, 10, 100_001)
    assert (grid**2 * ndtr(-grid)).max() <= u * u * ndtr(-u) * (1 + 1e-12)


def test_the_pair_term_is_d2_q_and_does_not_underflow():
    d = np.array([0.0, 0.5, 1.0, 3.0])
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(np.exp(log_pair_term(d, 0.7)), d**2 * ndtr(-d / 1.4), rtol=1e-13)
    # d/2σ = 1000: Q underflows, its log is −u²/2 − ln(u√2π) to O(1/u²)
    want = 2 * math.log(2.0) - 1e6 / 2 - math.log(1000 * math.sqrt(2 * math.pi))
    assert log_pair_term(np.array([2.0]), 1e-3)[0] == pytest.approx(want, rel=1e-9)


def two_points(r: float, dim: int) -> torch.Tensor:
    a = torch.zeros(dim, dtype=torch.float64)
    a[0] = r
    return torch.stack([a, -a])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_on_two_points_the_bound_is_its_closed_form_and_above_the_exact_value(dtype):
    """N = 2, d = 2r: the bound is (1/(2D))·2·d²Q(d/2σ) = 4r²Q(r/σ)/D (the float32 pool's
    rounding allowance adds ~1e-6 relative); the exact J* (sech² quadrature) is below it at
    every σ, and where memorised within 4/π·1.02 of it: as σ → 0 the exact J* is
    (π/4)·4r²Q(r/σ)/D (the sech² integral's peak, ∫sech²(y)eʸdy = π), the ratio rising by
    O(σ²/r²) from 4/π = 1.273 (1.276 at r/σ = 10)."""
    r, dim = 1.0, 16
    b = bound_of(two_points(r, dim), 32, dtype)
    rtol = 1e-9 if dtype == torch.float64 else 1e-5
    for sigma in SIGMAS:
        exact, value = two_point_optimal_loss(r, dim, sigma), b(sigma)
        log_closed = math.log(4 * r * r / dim) + log_ndtr(-r / sigma)
        assert b.log_value(sigma) == pytest.approx(log_closed, rel=rtol, abs=rtol)
        assert value >= exact
        if exact > 0 and value <= MEMORISED_SHARE * r * r / dim:
            assert value / exact <= 4 / math.pi * 1.02
    # below float64's range the value is 0.0 and its log still the closed form's
    assert b(0.01) == 0.0
    assert b.log_value(0.01) == pytest.approx(math.log(0.25) + log_ndtr(-100.0), rel=rtol)


@pytest.mark.slow
def test_on_collinear_points_the_bound_is_above_the_exact_value_with_or_without_a_tail():
    """Ten points on a line in 4 dims, exact J* by quadrature (``line_optimal_loss``): the
    bound from the 3 nearest neighbours and a tail is above the one from all pairs, which is
    above J*, at every σ; the tail costs little where J* is memorised."""
    t = np.array([0.0, 0.3, 0.5, 1.2, 2.0, 2.1, 3.5, 4.0, 5.5, 6.0])
    u = torch.tensor([0.5, -0.5, 0.5, 0.5], dtype=torch.float64)
    x = torch.from_numpy(t)[:, None] * u + torch.tensor([1.0, 2.0, 0.0, -1.0])
    few, every = bound_of(x, 3), bound_of(x, 9)
    assert every.tail_count.sum() == 0 and few.tail_count.sum() == 10 * 6
    for sigma in SIGMAS:
        exact = line_optimal_loss(t, 4, sigma)
        assert few(sigma) >= every(sigma) >= exact, sigma
        assert few.log_value(sigma) >= every.log_value(sigma)
    assert few(0.01) <= every(0.01) * (1 + 1e-6)


def planar_optimal_loss(x: np.ndarray, sigma: float) -> float:
    """J* per element of points in 2 dims by brute force: ∫ p(y)·Var(x0 | y) dy / 2 by the
    trapezoid rule on a grid of spacing h = min(σ/10, σ²/(3·d_max)) (the posterior turns over
    a width σ²/d across each bisector) over the points' box ± 12σ, float64, in log space."""
    d_max = float(np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)).max())
    h = min(sigma / 10, sigma * sigma / (3 * d_max))
    lo, hi = x.min(axis=0) - 12 * sigma, x.max(axis=0) + 12 * sigma
    axes = [np.arange(lo[i], hi[i] + h, h) for i in (0, 1)]
    total = 0.0
    for gx in axes[0]:
        y = np.stack([np.full_like(axes[1], gx), axes[1]], axis=1)
        logits = -((y[:, None, :] - x[None]) ** 2).sum(-1) / (2 * sigma * sigma)
        top = logits.max(axis=1, keepdims=True)
        w = np.exp(logits - top)
        pi = w / w.sum(axis=1, keepdims=True)
        mu = pi @ x
        var = (pi * ((x[None] - mu[:, None]) ** 2).sum(-1)).sum(axis=1)
        log_p = top[:, 0] + np.log(w.sum(axis=1)) - math.log(len(x) * 2 * math.pi * sigma**2)
        total += float((np.exp(log_p) * var).sum())
    return total * h * h / 2


@pytest.mark.slow
def test_the_planar_brute_force_agrees_with_the_line_quadrature():
    t = np.array([0.0, 0.25, 0.6, 1.1])
    x = np.stack([t * 0.6, t * 0.8], axis=1)
    for sigma in (0.1, 0.3, 1.0):
        assert planar_optimal_loss(x, sigma) == pytest.approx(
            line_optimal_loss(t, 2, sigma), rel=1e-6
        )


@pytest.mark.slow
def test_on_a_random_planar_set_the_bound_is_above_the_brute_force_value():
    """Six random points in the unit square; the bound from 2 neighbours and a tail."""
    x = np.random.default_rng(3).random((6, 2))
    b = bound_of(torch.from_numpy(x), 2)
    for sigma in (0.1, 0.2, 0.4, 1.0, 3.0):
        assert b(sigma) >= planar_optimal_loss(x, sigma), sigma


def test_a_class_conditional_bound_sums_over_each_class():
    """Two classes of two points each: the bound is the mean of the two-point bounds."""
    a, b = two_points(1.0, 4), two_points(0.5, 4) + 10
    labels = torch.tensor([0, 0, 1, 1])
    both = bound_of(torch.cat([a, b]), 8, labels=labels)
    for sigma in (0.1, 0.5, 2.0):
        assert both(sigma) == pytest.approx((bound_of(a, 1)(sigma) + bound_of(b, 1)(sigma)) / 2)


def test_no_bound_where_the_index_misses_points(small_set):
    plan = OuterPlan.build(small_set, None, 20, 0, False)
    pools = make_pools(plan, torch.float64, torch.device("cpu"))
    assert NearestPointBound.from_index(plan, pools, neighbour_tables(plan, pools, 8)) is None


# --- in estimates and the CLI ----------------------------------------------------------------


def test_an_estimate_records_the_bound_and_flags_memorised_sigma():
    """Two points (r = 1, 16 dims, variance 1/16): at σ = 0.02 the tilted draws give 0 (ESS 0):
    not resolved, but memorised with the bound 4r²Q(r/σ)/D; at σ = 0.5 the bound is recorded
    (below the variance), not memorised; at σ = 50 it is above the variance: not recorded."""
    curve = estimate_curve(two_points(1.0, 16), [0.02, 0.5, 50.0], make_estimator("full", 2),
                           outer=2048, progress=False)  # fmt: skip
    low, mid, high = curve.points
    assert low.ess == 0.0 and low.resolved is False
    assert low.memorised is True and low.upper_bound == 0.0  # 4r²Q(50)/16 < 5e-324
    assert mid.memorised is False
    assert mid.upper_bound == pytest.approx(4 * ndtr(-2.0) / 16, rel=1e-5)
    assert mid.upper_bound >= two_point_optimal_loss(1.0, 16, 0.5)
    assert high.upper_bound is None and high.memorised is None
    assert curve.points == type(curve).from_json(json.loads(json.dumps(curve.to_json()))).points


def test_an_estimate_on_plain_draws_has_no_bound(small_set):
    curve = estimate_curve(small_set, [0.1], make_estimator("full", 40), draws="plain",
                           progress=False)  # fmt: skip
    assert curve.points[0].upper_bound is None and curve.points[0].closed_rounding is None


@pytest.mark.slow
def test_the_cli_reports_memorised_sigma_by_their_bound_without_a_warning(tmp_path, capsys):
    """digits (300 points) at σ where its draws cannot resolve J*: the table shows "≤ bound"
    and "memorised", the JSON the bound, and stderr has no warning; plain draws (no index)
    still warn."""
    out = tmp_path / "c.json"
    args = ["estimate", "--data", "digits", "--limit", "300", "--sigmas", "0.02,0.05,2"]
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "warning" not in text.err
    rows = [line for line in text.out.splitlines() if " memorised ≤ " in line]
    assert len(rows) == 2, text.out
    points = json.loads(out.read_text())["points"]
    variance = json.loads(out.read_text())["data_variance"]
    for p in points[:2]:
        assert p["memorised"] is True and p["upper_bound"] <= MEMORISED_SHARE * variance
        assert p["resolved"] is False and f"{p['upper_bound']:.4g}" in text.out
    assert points[2]["resolved"] is True and "memorised" not in points[2]
    assert main([*args, "--draws", "plain", "--quiet"]) == 0
    assert "J* is not resolved at σ = 0.02" in capsys.readouterr().err


def test_the_plot_marks_unresolved_points_and_memorised_bounds(monkeypatch, tmp_path):
    """Hollow markers at the unresolved estimate, a ▼ at the bound (not the estimate) where
    memorised, each with its legend entry."""
    import dataclasses

    import lossfloor.plots as plots
    from lossfloor.optimal import Curve, CurvePoint

    pts = (
        CurvePoint(sigma=0.1, optimal_loss=1e-12, resolved=False, upper_bound=1e-9, memorised=True),
        CurvePoint(sigma=0.3, optimal_loss=1e-4, stderr=5e-5, resolved=False),
        CurvePoint(sigma=1.0, optimal_loss=0.05, stderr=1e-3, resolved=True),
    )
    shown = {}
    monkeypatch.setattr(plots.curves, "save_figure", lambda fig, path: shown.update(fig=fig))
    plots.plot_optimal_loss(tmp_path / "c.png", [("full", Curve(points=pts))])
    ax = shown["fig"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines[plots.MEMORISED].get_xydata().tolist() == [[0.1, 1e-9]]
    assert lines[plots.UNRESOLVED].get_xydata().tolist() == [[0.3, 1e-4]]
    assert lines[plots.UNRESOLVED].get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
    assert lines["full"].get_xydata()[:, 0].tolist() == [0.3, 1.0]  # no estimate where bounded
    plain = Curve(points=tuple(dataclasses.replace(p, resolved=True) for p in pts))
    plots.plot_optimal_loss(tmp_path / "c.png", [("full", plain)])
    labels = shown["fig"].axes[0].get_legend_handles_labels()[1]
    assert plots.MEMORISED not in labels and plots.UNRESOLVED not in labels


@pytest.mark.slow
def test_a_streamed_estimate_bounds_j_from_the_rows_it_reads(tmp_path):
    """Streamed data: the bound reads the rows the draws' index lists (capped at the 5 other
    points here, as in memory), so it equals the in-memory one up to the float32 rows'
    allowance e₀; on three far-apart copies of the two-point set it is at least the two-point
    bound (each source's term is its partner's, plus far terms), so above its exact J*."""
    from lossfloor.data.chunked import open_chunked

    x = two_points(1.0, 16).float()
    x = torch.cat([x, x + 5, x - 5])
    np.save(tmp_path / "p.npy", x.numpy())
    est, sigmas = make_estimator("full", 6), [0.05, 0.3]
    streamed = estimate_curve(open_chunked(str(tmp_path / "p.npy")), sigmas, est, progress=False)
    memory = estimate_curve(x, sigmas, est, progress=False)
    for s, m in zip(streamed.points, memory.points, strict=True):
        assert s.upper_bound == pytest.approx(m.upper_bound, rel=1e-5)
        assert s.upper_bound >= two_point_optimal_loss(1.0, 16, s.sigma)

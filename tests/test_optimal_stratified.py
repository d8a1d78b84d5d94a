"""The stratified inner estimator: near stratum exact, far stratum a uniform sample weighted by
its inverse inclusion probability (issue 8 item 2)."""

from __future__ import annotations

import math

import pytest
import torch

from lossfloor.data import load_dataset
from lossfloor.errors import ParameterError
from lossfloor.optimal import ESTIMATORS, estimate_curve, make_estimator
from lossfloor.optimal.draws import OUTER_BLOCK
from lossfloor.optimal.estimators import Stratified
from lossfloor.optimal.kernel import accumulate_softmax, posterior_mean
from lossfloor.optimal.neighbours import nearest_neighbours
from lossfloor.optimal.pools import Pool


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=400)


def pool_with_index(n: int = 400, d: int = 4, k: int = 8) -> Pool:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pool = Pool.from_data(x, torch.float64, "cpu")
    pool.neighbours = nearest_neighbours(pool, torch.arange(n), k)
    return pool


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_far_stratum_covering_everything_is_full_bitwise(digits, precision, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path))
    sigmas = [0.05, 0.5, 2.0, 20.0]
    kw = dict(outer=1500, seed=3, precision=precision, form="combined", progress=False)
    full = estimate_curve(digits.x, sigmas, make_estimator("full", 400), **kw)
    est = make_estimator("stratified", 400, inner=400, near=16, share=OUTER_BLOCK)
    strat = estimate_curve(digits.x, sigmas, est, **kw)
    for f, s in zip(full.points, strat.points, strict=True):
        assert (s.closed, s.direct, s.optimal_loss) == (f.closed, f.direct, f.optimal_loss)


@pytest.mark.numerics
def test_an_empty_near_stratum_is_snis_with_weights():
    """near = 0: μ over the far sample R with every key weighted N/L — the kernel with key
    log-weights log(N/L), bitwise; and, the weights being equal, SNIS's μ over R."""
    pool = pool_with_index()
    g = torch.Generator().manual_seed(4)
    src = torch.randint(400, (300,), generator=g)
    q = pool.x[src] + 0.7 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    got = Stratified(inner=50, near=0, share=100).posterior_mean(
        pool, q, src, 0.7, torch.Generator().manual_seed(9)
    )
    gen = torch.Generator().manual_seed(9)
    for start in range(0, 300, 100):
        idx = torch.randperm(400, generator=gen)[:50].sort().values
        logw = torch.full((50,), math.log(400 / 50), dtype=torch.float64)
        qb = q[start : start + 100]
        ref = accumulate_softmax(
            qb, None, 0.7, keys_aug=pool.augmented()[idx], key_logw=logw
        ).mean()
        assert torch.equal(got[start : start + 100], ref)
        snis = posterior_mean(qb, pool.x[idx], 0.7)
        torch.testing.assert_close(got[start : start + 100], snis, rtol=1e-12, atol=1e-14)


def test_the_near_stratum_is_exact_where_the_posterior_lives_in_it():
    """At small σ the posterior is the source and its nearest points: with any far sample the
    estimate is the exact μ (to rounding), where SNIS on the same far sample is far off."""
    pool = pool_with_index()
    g = torch.Generator().manual_seed(5)
    src = torch.randint(400, (200,), generator=g)
    q = pool.x[src] + 0.03 * torch.randn(200, 4, generator=g, dtype=torch.float64)
    exact = posterior_mean(q, pool.x, 0.03)
    strat = Stratified(inner=10, near=9).posterior_mean(pool, q, src, 0.03, g)
    snis = Stratified(inner=10, near=0).posterior_mean(pool, q, src, 0.03, g)
    torch.testing.assert_close(strat, exact, rtol=1e-9, atol=1e-9)
    assert (snis - exact).abs().max() > 0.1


@pytest.mark.slow
def test_error_falls_at_the_ratio_estimator_rate():
    """μ̂ is a ratio of two Horvitz–Thompson sums: E‖μ̂ − μ‖² ≈ c·(1 − L/N)/L, and the direct
    form's J* error (its bias, +E‖μ̂ − μ‖²) the same. Against the float64 exact μ, σ = 2,
    N = 400, near = 4, L = 25…200: the error falls ~14×; times L/(1 − L/N) the MSE stays
    within 1.4× and the J* error (noisier: its zero-mean part is O(1/√(L·M))) within 1.8× —
    a 1/√L rate would grow it 2.8× over this range, no decrease 8×."""
    pool = pool_with_index()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(400, (2000,), generator=g)
    x0 = pool.x[src]
    q = x0 + 2.0 * torch.randn(2000, 4, generator=g, dtype=torch.float64)
    mu = posterior_mean(q, None, 2.0, keys_aug=pool.augmented())
    j_exact = (x0 - mu).pow(2).sum(1).mean().item()
    mse, bias = [], []
    sizes = [25, 50, 100, 200]
    for big in sizes:
        est = Stratified(inner=big, near=4, share=4)
        mu_hat = est.posterior_mean(pool, q, src, 2.0, torch.Generator().manual_seed(1))
        scale = big / (1 - big / 400)
        mse.append((mu_hat - mu).pow(2).sum(1).mean().item() * scale)
        bias.append(((x0 - mu_hat).pow(2).sum(1).mean().item() - j_exact) * scale)
    assert max(mse) / min(mse) < 1.4, mse
    assert min(bias) > 0 and max(bias) / min(bias) < 1.8, bias
    raw = [m / (s / (1 - s / 400)) for m, s in zip(mse, sizes, strict=True)]
    assert raw[0] / raw[-1] > 8


def test_stratified_is_registered_round_trips_and_checks_its_parameters():
    est = make_estimator("stratified", 1000)
    assert (est.inner, est.near) == (50, 16)
    assert ESTIMATORS.from_config(est.to_config()) == est
    with pytest.raises(ParameterError, match="near"):
        make_estimator("stratified", 10, near=11)
    with pytest.raises(ParameterError, match="inner"):
        make_estimator("stratified", 10, inner=0)
    for other in ("cdol", "full"):
        with pytest.raises(ParameterError, match="near"):
            make_estimator(other, 10, near=3)


@pytest.mark.slow
def test_the_cli_runs_stratified_and_refuses_options_it_does_not_take(tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    import json

    from lossfloor.cli import main

    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "s.json"
    rc = main(["estimate", "--data", "digits", "--limit", "300", "--sigmas", "0.05,5",
               "--estimator", "stratified", "--inner", "30", "--near", "8",
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["estimator"]["name"] == "stratified" and rec["estimator"]["near"] == 8
    rc = main(["estimate", "--data", "digits", "--limit", "300", "--estimator", "stratified",
               "--replace", "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert rc == 2 and "--replace" in capsys.readouterr().err

"""The ``gram`` estimator (``optimal/gram.py``): exact posterior weights from two Gram products
shared by a σ grid, the source term exactly and L weight-proportional draws of the rest R,
giving unbiased per-draw values of both forms (U-statistics) and of μ."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import lossfloor.optimal.estimate as estimate_module
import lossfloor.optimal.gram as gram_module
import lossfloor.optimal.sweep as sweep_module
from lossfloor.cli import main
from lossfloor.data import load_dataset
from lossfloor.errors import ParameterError
from lossfloor.optimal import ESTIMATORS, Full, Gram, estimate_curve, make_estimator
from lossfloor.optimal.analytic import two_point_optimal_loss
from lossfloor.optimal.checkpoint import Checkpoint
from lossfloor.optimal.draws import resolve_draws
from lossfloor.optimal.moments import resolve_form
from lossfloor.optimal.pools import Pool

#: Two points ±a in 16 dims, ‖a‖ = R (tests/test_optimal_rare_events.py).
DIM, R = 16, 2.2128884383056144


def two_points() -> torch.Tensor:
    a = torch.full((DIM,), R / math.sqrt(DIM), dtype=torch.float64)
    return torch.stack([a, -a])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def without_seconds(rec: dict) -> dict:
    return {
        **rec,
        "points": [{k: v for k, v in p.items() if k != "seconds"} for p in rec["points"]],
    }


def draws_of(pool: Pool, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m random sources of ``pool``, m standard normal ε in the pool's dims and dtype)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(pool.n, (m,), generator=g)
    noise = torch.randn(m, pool.dim, generator=g, dtype=torch.float64)
    return src, noise.to(pool.x.dtype)


# --- exact where R is one point -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("inner", [2, 7, 32])
def test_two_points_per_draw_values_are_full_s(inner):
    """{+a, −a}: R is the one other point, every draw picks it, ū = u and the U-statistic is
    ‖u‖² exactly, so closed and direct are full's per draw (to rounding) for any L."""
    pool = Pool.from_data(two_points(), torch.float64, "cpu")
    src, noise = draws_of(pool, 500, seed=1)
    for sigma in [0.05, 0.3, 1.0, 3.0, 20.0]:
        got = Gram(inner=inner)(pool, src, noise, sigma, torch.Generator().manual_seed(2))
        ref = Full()(pool, src, noise, sigma, torch.Generator().manual_seed(2))
        torch.testing.assert_close(got.closed, ref.closed, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.direct, ref.direct, rtol=1e-12, atol=1e-12)
        if sigma >= 1.0:
            assert ref.direct.mean() > 1e-3  # not a comparison of zeros


@pytest.mark.slow
def test_two_points_curve_is_full_s_on_the_same_draws():
    sigmas = [0.05, 0.3, 0.6, 1.0, 3.0, 20.0]
    kw = dict(outer=3000, seed=7, draws="plain", precision="float64", progress=False)
    full = estimate_curve(two_points(), sigmas, make_estimator("full", 2), **kw)
    gram = estimate_curve(two_points(), sigmas, make_estimator("gram", 2), **kw)
    assert gram.estimator["name"] == "gram" and gram.form == "combined"
    for f, g in zip(full.points, gram.points, strict=True):
        for key in ("optimal_loss", "stderr", "closed", "direct"):
            assert getattr(g, key) == pytest.approx(getattr(f, key), rel=1e-9, abs=1e-15), key
    # and full's values are the quadrature's where the draws resolve J*
    for p in gram.points[3:]:
        assert abs(p.optimal_loss - two_point_optimal_loss(R, DIM, p.sigma)) < 4 * p.stderr


# --- unbiased per draw ------------------------------------------------------------------------

#: Repeats of the inner sample per outer draw in the brute-force tests.
REPEATS = 3000


def tiny_pool() -> Pool:
    """6 irregular points in 3 dims (float64), of different norms: at σ ≥ 0.5 most posteriors
    spread over several points."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64) * torch.tensor([0.5, 0.3, 0.15])
    x[2] *= 2.5
    return Pool.from_data(x, torch.float64, "cpu")


def exact_weights(pool: Pool, q: torch.Tensor, sigma: float) -> torch.Tensor:
    """The posterior softmax(−‖q − x_n‖²/2σ²) over the pool (brute force, float64)."""
    return torch.softmax(-torch.cdist(q, pool.x).pow(2) / (2 * sigma * sigma), dim=1)


def repeat_mean(values: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, its standard error) over REPEATS of each of m draws (rows repeat-major)."""
    v = values.reshape(REPEATS, m, *values.shape[1:])
    return v.mean(dim=0), v.std(dim=0) / math.sqrt(REPEATS)


@pytest.mark.slow
@pytest.mark.parametrize("inner", [2, 5])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_per_draw_forms_are_unbiased(inner, sigma):
    """Each outer draw repeated REPEATS times, each repeat its own L draws of R: the average of
    gram's closed and direct is the exact per-draw value within 4 standard errors; and the
    naive plug-in ‖m_R·ū‖² (biased by m_R²·E_R‖u − E_R u‖²/L) would be caught."""
    pool, m = tiny_pool(), 20
    src, noise = draws_of(pool, m, seed=12)
    src[:6] = torch.arange(6)  # every point a source
    ref = Full()(pool, src, noise, sigma, torch.Generator())
    # an independent brute force of the reference
    q = pool.x[src] + sigma * noise
    w = exact_weights(pool, q, sigma)
    mu = w @ pool.x
    torch.testing.assert_close(ref.direct, (pool.x[src] - mu).pow(2).sum(1) / 3, rtol=1e-12,
                               atol=1e-15)  # fmt: skip
    torch.testing.assert_close(ref.closed, (pool.a - mu.pow(2).sum(1)) / 3, rtol=1e-12,
                               atol=1e-15)  # fmt: skip

    got = Gram(inner=inner)(pool, src.repeat(REPEATS), noise.repeat(REPEATS, 1), sigma,
                            torch.Generator().manual_seed(13))  # fmt: skip
    for form in ("closed", "direct"):
        mean, se = repeat_mean(getattr(got, form), m)
        exact = getattr(ref, form)
        scale = exact.abs().max()
        assert (se > 1e-4 * scale).sum() >= m // 2, form  # the repeats vary
        # within 4 standard errors (draws whose posterior is the source alone: to rounding)
        assert bool(((mean - exact).abs() <= 4 * se + 1e-12 * scale).all()), (form, mean - exact)

    # the plug-in's bias per draw, in standard errors of the direct form's average
    rest = w.clone()
    rest[torch.arange(m), src] = 0.0
    mass = rest.sum(1)
    p = rest / mass[:, None]
    u = pool.x[None, :, :] - pool.x[src][:, None, :]  # u_n = x_n − x0
    mean_u = (p[:, :, None] * u).sum(1)
    spread = (p * (u - mean_u[:, None, :]).pow(2).sum(2)).sum(1)
    bias = mass**2 * spread / inner / 3
    _, se = repeat_mean(got.direct, m)
    caught = bias > 8 * se
    assert caught.sum() >= m // 2, bias / se


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_posterior_mean_is_unbiased(sigma):
    pool, m = tiny_pool(), 20
    src, noise = draws_of(pool, m, seed=14)
    q = pool.x[src] + sigma * noise
    exact = Full().posterior_mean(pool, q, src, sigma, torch.Generator())
    torch.testing.assert_close(exact, exact_weights(pool, q, sigma) @ pool.x, rtol=1e-12,
                               atol=1e-14)  # fmt: skip
    got = Gram(inner=3).posterior_mean(pool, q.repeat(REPEATS, 1), src.repeat(REPEATS), sigma,
                                       torch.Generator().manual_seed(15))  # fmt: skip
    mean, se = repeat_mean(got, m)
    assert (se > 1e-4).sum() >= mean.numel() // 2  # the repeats vary
    assert bool(((mean - exact).abs() <= 4 * se + 1e-12).all()), mean - exact


@pytest.mark.slow
def test_error_falls_like_one_over_root_L(digits):
    """The rest enters through a mean of L iid draws (x̄, ū) and U-statistics of degree 2
    (‖E_R x‖², ‖E_R u‖²), whose variance is 4ζ₁/L + 2ζ₂/(L(L−1)) = O(1/L): the per-draw RMS
    error against full falls like 1/√L, so RMS(L=16)/RMS(L=256) ≈ √16 = 4."""
    pool = Pool.from_data(digits.x, torch.float64, "cpu")
    src, noise = draws_of(pool, 400, seed=16)
    for sigma in [1.0, 1.5]:  # J*/var ≈ 0.25 and 0.53
        ref = Full()(pool, src, noise, sigma, torch.Generator())
        rms = {}
        for inner in (16, 256):
            got = Gram(inner=inner)(pool, src, noise, sigma, torch.Generator().manual_seed(inner))
            rms[inner] = [
                (getattr(got, f) - getattr(ref, f)).pow(2).mean().sqrt().item()
                for f in ("closed", "direct")
            ]
        for form, small, big in zip(("closed", "direct"), rms[16], rms[256], strict=True):
            assert 2.5 <= small / big <= 6.5, (sigma, form, small, big)


# --- the sweep is the per-σ path -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_values_are_each_sigma_alone_bitwise(digits, dtype):
    """300 draws: a block of GRAM_ROWS = 256 and a rest of 44 (not a multiple of ``rows``)."""
    pool = Pool.from_data(digits.x[:300], dtype, "cpu")
    src, noise = draws_of(pool, 300, seed=17)
    sigmas = [0.1, 0.5, 2.0, 10.0]
    est = Gram(inner=8, rows=16)
    sweep = est.grid_values(pool, src, noise, sigmas,
                            [torch.Generator().manual_seed(i) for i in range(4)])  # fmt: skip
    for i, sigma in enumerate(sigmas):
        alone = est(pool, src, noise, sigma, torch.Generator().manual_seed(i))
        assert torch.equal(sweep[i].closed, alone.closed)
        assert torch.equal(sweep[i].direct, alone.direct)
    assert not torch.equal(sweep[1].direct, sweep[2].direct)


def test_grid_values_do_not_depend_on_the_thread_count_and_restore_it(digits):
    """The per-σ passes run in one thread whatever torch's setting (issue 27 item 14); the
    values are the same bitwise with 1 and 2 threads, and the setting is restored."""
    pool = Pool.from_data(digits.x[:300], torch.float32, "cpu")
    src, noise = draws_of(pool, 300, seed=5)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(Gram(inner=8).grid_values(pool, src, noise, [0.3, 3.0],
                                                  [torch.Generator().manual_seed(i)
                                                   for i in range(2)]))  # fmt: skip
            assert torch.get_num_threads() == t
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs, strict=True):
        assert torch.equal(one.closed, two.closed) and torch.equal(one.direct, two.direct)


def test_small_ops_run_in_one_thread_but_the_products_in_torch_s(digits, monkeypatch):
    """Beside a busy process (issue 25 item 5): inside ``small_ops`` (nested or not) torch runs
    one thread, the two Gram products of a block the threads set outside it; on leaving, the
    setting is restored."""
    pool = Pool.from_data(digits.x[:300], torch.float32, "cpu")
    src, noise = draws_of(pool, 300, seed=5)
    toward = [torch.where(torch.arange(300) % 2 == 0, (src + 1) % 300, -1)] * 2
    seen: list[int] = []
    real = Pool.products

    def products(self, pad=0):
        inner = real(self, pad)

        def call(rows, out=None):
            seen.append(torch.get_num_threads())
            return inner(rows, out=out)

        return call

    monkeypatch.setattr(Pool, "products", products)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with gram_module.small_ops():
            assert torch.get_num_threads() == 1
            Gram(inner=8).grid_values(pool, src, noise, [0.3, 3.0],
                                      [torch.Generator().manual_seed(i) for i in range(2)],
                                      toward)  # fmt: skip
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    # the base products (one per GRAM_ROWS draws) in 2 threads, the tilted draws' neighbour
    # products (one per 16 draws: small GEMMs) in one
    assert seen.count(2) == -(-300 // gram_module.GRAM_ROWS)
    assert seen.count(1) == -(-300 // 16) and len(seen) == seen.count(1) + seen.count(2)


def _swept_and_by_sigma(x, sigmas, kw, monkeypatch):
    """gram (inner 8) on ``x`` with options ``kw``: the curve from the sweep (asserting that no
    σ ran through ``per_sample_values``), the curve σ by σ, and the σ that ran there."""
    est = make_estimator("gram", 400, inner=8)
    real = estimate_module.per_sample_values
    calls = []
    monkeypatch.setattr(estimate_module, "per_sample_values",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))  # fmt: skip
    sweep = estimate_curve(x, sigmas, est, **kw)
    assert calls == []
    monkeypatch.setattr(estimate_module, "sweeps", lambda *a: False)
    return sweep, estimate_curve(x, sigmas, est, **kw), calls


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_the_curve_s_sweep_is_the_per_sigma_path(digits, precision, monkeypatch):
    """M = 1500 (two outer blocks): the sweep (``sweep._grid_values``, no ``per_sample_values``)
    gives the numbers of gram run σ by σ through ``per_sample_values``, bitwise."""
    x, sigmas = digits.x[:400], [0.2, 0.7, 2.0, 8.0]
    kw = dict(outer=1500, seed=5, draws="plain", precision=precision, progress=False)
    sweep, by_sigma, calls = _swept_and_by_sigma(x, sigmas, kw, monkeypatch)
    assert calls == sigmas
    assert without_seconds(sweep.to_json()) == without_seconds(by_sigma.to_json())


# --- against full on the same draws ----------------------------------------------------------


def _within(gram, full, tol: float, where: float) -> int:
    """Assert |gram − full|/full < tol at every σ where full's J* > where·variance; how many."""
    compared = 0
    for f, g in zip(full.points, gram.points, strict=True):
        if f.optimal_loss > where * full.data_variance:
            compared += 1
            assert abs(g.optimal_loss - f.optimal_loss) / f.optimal_loss < tol, (f, g)
    return compared


@pytest.mark.slow
def test_curve_is_full_s_within_3_percent(digits):
    sigmas = [0.3, 0.5, 0.7, 1.0, 2.0, 3.0, 7.0, 20.0]
    kw = dict(outer=1797, seed=0, draws="plain", progress=False)
    full = estimate_curve(digits.x, sigmas, make_estimator("full", 1797), **kw)
    gram = estimate_curve(digits.x, sigmas, make_estimator("gram", 1797), **kw)
    assert _within(gram, full, 0.03, where=1e-3) >= 6


@pytest.mark.slow
def test_values_are_finite_and_not_negative_from_1e_3_to_1e3(digits):
    """auto precision (float64 at the small σ, float32 elsewhere): finite, ≥ 0, and full's
    (0) where the posterior is the source alone. The closed form's mean is A − ‖μ‖² to float32
    rounding where J* ≈ 0 (σ = 0.05: full's is −5.1e-10, gram's −7.2e-13; the reported value
    then takes the direct form), so it is held to ≥ −1e-8·variance, not ≥ 0."""
    x, sigmas = digits.x[:500], [1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0, 10.0, 100.0, 1e3]
    kw = dict(outer=1000, seed=1, draws="plain", progress=False)
    full = estimate_curve(x, sigmas, make_estimator("full", 500), **kw)
    gram = estimate_curve(x, sigmas, make_estimator("gram", 500), **kw)
    assert {p.dtype for p in gram.points} == {"float32", "float64"}
    for f, g in zip(full.points, gram.points, strict=True):
        assert g.dtype == f.dtype
        for key in ("optimal_loss", "stderr", "direct", "direct_stderr", "closed_stderr"):
            value = getattr(g, key)
            assert math.isfinite(value) and value >= 0, (g.sigma, key, value)
        assert math.isfinite(g.closed) and g.closed >= -1e-8 * gram.data_variance, g
        if f.sigma <= 0.01:
            assert g.optimal_loss == f.optimal_loss == 0.0
        if f.sigma >= 1.0:
            assert g.optimal_loss == pytest.approx(f.optimal_loss, rel=0.03)


# --- configuration ---------------------------------------------------------------------------


def test_config_round_trip_and_checks():
    est = Gram(inner=8, rows=4)
    assert est.to_config() == {"name": "gram", "inner": 8, "rows": 4}
    assert ESTIMATORS.from_config(est.to_config()) == est
    assert ESTIMATORS.from_config(Gram().to_config()) == Gram(inner=32, rows=16)
    for kw, param in [({"inner": 1}, "inner"), ({"inner": 0}, "inner"), ({"rows": 0}, "rows")]:
        with pytest.raises(ParameterError) as exc:
            Gram(**kw)
        assert exc.value.param == param
    assert make_estimator("gram", 100, inner=8) == Gram(inner=8)
    assert make_estimator("gram", 100_000) == Gram()  # 32 draws whatever N
    with pytest.raises(ParameterError) as exc:
        make_estimator("gram", 100, near=4)
    assert exc.value.param == "near"
    with pytest.raises(ParameterError) as exc:
        make_estimator("gram", 100, C=3.0)
    assert exc.value.param == "C"
    assert resolve_form("auto", Gram()) == "combined"
    assert resolve_draws("auto", Gram()) == "tilted"


# --- CLI -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_records_gram(tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = main(["estimate", "--data", "digits", "--estimator", "gram", "--outer", "512",
               "--sigmas", "0.5,2", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    est = rec["estimator"]
    assert (est["name"], est["inner"], est["rows"]) == ("gram", 32, 16)
    assert est["draws"] == "tilted" and est["form"] == "combined" and est["outer"] == 512
    assert [p["sigma"] for p in rec["points"]] == [0.5, 2.0]
    assert all(p["optimal_loss"] > 0 for p in rec["points"])


def test_cli_refuses_bad_sizes_of_gram(tmp_path, capsys):
    path = tmp_path / "points.npy"
    np.save(path, np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32))
    base = ["estimate", "--data", str(path), "--sigmas", "1", "--quiet", "--estimator", "gram"]
    for extra, says in [
        (["--inner", "1"], "≥ 2"),
        (["--near", "4"], "stratified only"),
    ]:
        out = tmp_path / "x.json"
        assert main([*base, *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()


# --- streamed and sharded ----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_stream_gives_the_in_memory_numbers(tmp_path, capsys):
    """digits, 6 σ, float64, read in chunks of 292 rows (the products per chunk, a block of
    SAMPLE_BLOCK columns across two chunks): every number of each point the in-memory run's
    to float64 rounding (the same draws of the rest but where a uniform falls within the
    rounding of a column's cumulative edge, ~N·1e-16 per draw: ``gram`` module docstring).
    Plain draws: tilted ones follow the neighbour index, whose ties (digits' integer pixels)
    the streamed index may break otherwise, as it does for ``full``."""
    argv = ["estimate", "--data", "digits", "--estimator", "gram", "--dtype", "float64",
            "--sigmas", "0.2,0.5,1,2,5,20", "--draws", "plain", "--quiet"]  # fmt: skip
    curves = []
    for extra, name in [([], "memory.json"), (["--stream", "--chunk-mb", "0.5"], "stream.json")]:
        assert main([*argv, *extra, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        curves.append(json.loads((tmp_path / name).read_text()))
    memory, streamed = curves
    assert (
        streamed["dataset"]["streamed"]
        and memory["dataset"]["sha256"] == streamed["dataset"]["sha256"]
    )
    for m, s in zip(memory["points"], streamed["points"], strict=True):
        for key in ("optimal_loss", "stderr", "closed", "closed_stderr", "direct", "direct_stderr"):
            assert s[key] == pytest.approx(m[key], rel=1e-9, abs=1e-15), (key, m, s)


def test_gram_streams_where_memory_is_short_and_gives_the_in_memory_numbers(tmp_path, capsys):
    """The library's rule (``stream.must_stream``) applies to gram as to every estimator: an
    estimate that would not fit in --memory-gb streams, says so, and (float64, the whole data
    in one chunk) gives the in-memory numbers to rounding."""
    path = tmp_path / "points.npy"
    np.save(path, np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32))
    base = ["estimate", "--data", str(path), "--sigmas", "1,3,9", "--estimator", "gram",
            "--dtype", "float64", "--quiet"]  # fmt: skip
    curves = []
    for memory in ("0.00001", "1"):
        out = tmp_path / f"{memory}.json"
        assert main([*base, "--memory-gb", memory, "--out", str(out)]) == 0
        assert ("streaming it" in capsys.readouterr().err) == (memory != "1")
        curves.append(json.loads(out.read_text()))
    assert curves[0]["dataset"]["streamed"] is True and "streamed" not in curves[1]["dataset"]
    for s, m in zip(curves[0]["points"], curves[1]["points"], strict=True):
        assert s["optimal_loss"] == pytest.approx(m["optimal_loss"], rel=1e-12)
        assert s["direct"] == pytest.approx(m["direct"], rel=1e-12)


@pytest.mark.numerics
def test_streamed_products_in_chunks_smaller_than_a_block_give_the_in_memory_values(tmp_path):
    """Chunks of 11 rows, each its own GEMM, against one GEMM in memory (float64, 700 points,
    4 σ): the per-draw values to float64 rounding of the logits (their relative error ~1e-16
    times the logits' size, ≤ ~1e3 at σ = 0.1), and an estimate of μ (``posterior_mean``)."""
    from lossfloor.data.chunked import open_chunked
    from lossfloor.distributed import Group
    from lossfloor.optimal.stream import StreamedPool

    x = load_dataset("digits").x[:700]
    np.save(tmp_path / "points.npy", x.numpy())
    memory = Pool.from_data(x, torch.float64, "cpu")
    chunked = open_chunked(str(tmp_path / "points.npy"), chunk_mb=11 * 28 * 64 / 2**20)
    chunked.summarise()
    streamed = StreamedPool.from_stream(chunked, torch.float64, "cpu", Group())
    assert streamed.chunk == 11
    src, noise = draws_of(memory, 300, seed=4)
    sigmas, est = [0.1, 0.5, 2.0, 10.0], Gram(inner=8)
    runs = [
        est.grid_values(
            pool, src, noise, sigmas, [torch.Generator().manual_seed(i) for i in range(4)]
        )
        for pool in (memory, streamed)
    ]
    for m, s in zip(*runs, strict=True):
        for form in ("closed", "direct"):
            ref = getattr(m, form)
            torch.testing.assert_close(
                getattr(s, form), ref, rtol=1e-11, atol=1e-11 * float(ref.abs().max())
            )
    q = memory.rows(src)[0] + 0.5 * noise
    mus = [
        est.posterior_mean(p, q, src, 0.5, torch.Generator().manual_seed(1))
        for p in (memory, streamed)
    ]
    torch.testing.assert_close(mus[1], mus[0], rtol=1e-11, atol=1e-11)


def test_the_split_across_the_processes_of_one_is_split_bitwise(digits):
    """``_shard_split`` (the draws across processes: a process by its mass, then a column) on
    a sharded pool of one process, whose collectives return their input, is ``_split``: the
    same source weight, mass and columns, bitwise, float32."""
    from lossfloor.distributed import Group
    from lossfloor.optimal.gram import _padded, _shard_split, _split, _weights
    from lossfloor.optimal.shard import ShardedPool

    pool = ShardedPool.from_shard(digits.x[:600], torch.float32, "cpu", Group())
    src, noise = draws_of(pool, 16, seed=9)
    prod, half_sq = pool.products(_padded(600) - 600)(pool.rows(src)[0] + 0.7 * noise)
    logits = prod - half_sq
    logits -= logits.amax(dim=1, keepdim=True)
    w = _weights(logits, 0.7**-2, 600)
    draws = 1.0 - torch.rand(16, 32, generator=torch.Generator().manual_seed(3))
    one, many = _split(w.clone(), src, draws), _shard_split(w.clone(), src, draws, pool)
    assert all(torch.equal(a, b) for a, b in zip(one, many, strict=True))
    assert len(set(one[2].flatten().tolist())) > 32  # the draws spread over the columns


def test_products_that_do_not_fit_take_fewer_draws_or_are_refused(monkeypatch):
    """The two products of GRAM_ROWS draws with N_k columns take 2·GRAM_ROWS·N_k·itemsize
    bytes: fewer draws (a multiple of ``rows``) where that exceeds PRODUCT_SHARE of the memory
    available, a one-line refusal naming the size where even ``rows`` draws' do not fit."""
    import types

    from lossfloor.errors import UserError
    from lossfloor.optimal import gram, stream

    big = types.SimpleNamespace(n_held=1_000_000, shards=1)  # products of 1,000,192 columns
    per_draw = 2 * 1_000_192 * 4
    assert (
        gram._rows_per_product(types.SimpleNamespace(n_held=1797, shards=1), 4, 16)
        == gram.GRAM_ROWS
    )
    monkeypatch.setattr(stream, "available_bytes", lambda: 2 * 100 * per_draw)
    assert gram._rows_per_product(big, 4, 16) == 96  # 100 draws fit: 6 × 16
    monkeypatch.setattr(stream, "available_bytes", lambda: 2 * 15 * per_draw)
    says = r"needs 0\.119 GiB per process for the products of 16 draws with 1000000 points, "
    with pytest.raises(UserError, match=says + r"more than the 0\.112 GiB") as exc:
        gram._rows_per_product(big, 4, 16)
    assert "\n" not in str(exc.value)


# --- checkpoint ------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_is_removed_and_an_interrupted_sweep_resumes(digits, tmp_path, monkeypatch):
    x, sigmas = digits.x[:300], [0.01, 0.5, 1.0, 2.0, 4.0]
    est = make_estimator("gram", 300, inner=8)
    kw = dict(outer=600, seed=3, progress=False)
    ref = estimate_curve(x, sigmas, est, **kw)
    ckpt = tmp_path / "curve.partial"
    again = estimate_curve(x, sigmas, est, checkpoint=ckpt, **kw)
    assert not ckpt.exists()
    assert without_seconds(again.to_json()) == without_seconds(ref.to_json())

    real_add = Checkpoint.add
    adds = []

    def flaky(self, name, point):
        adds.append(point["sigma"])
        if len(adds) == 3:
            raise KeyboardInterrupt
        real_add(self, name, point)

    monkeypatch.setattr(Checkpoint, "add", flaky)
    with pytest.raises(KeyboardInterrupt):
        estimate_curve(x, sigmas, est, checkpoint=ckpt, **kw)
    held = [p["sigma"] for p in json.loads(ckpt.read_text())["done"].values()]
    assert held == adds[:2]

    monkeypatch.setattr(Checkpoint, "add", real_add)
    real_grid = sweep_module._grid_values
    swept = []
    monkeypatch.setattr(sweep_module, "_grid_values",
                        lambda *a: swept.extend(a[2]) or real_grid(*a))  # fmt: skip
    resumed = estimate_curve(x, sigmas, est, checkpoint=ckpt, **kw)
    assert sorted(swept) == sorted(s for s in sigmas if s not in held)
    assert not ckpt.exists()
    assert without_seconds(resumed.to_json()) == without_seconds(ref.to_json())


@pytest.mark.slow
@pytest.mark.parametrize("draws", ["plain", "tilted"])
def test_a_sweep_interrupted_after_k_blocks_resumes_at_block_k_with_the_same_numbers(
    digits, tmp_path, monkeypatch, draws
):
    """A conditional sweep of M = 3500 (four blocks, the last of 428 draws) interrupted after
    two finished blocks: the checkpoint holds those two blocks' values of every σ (2·S·1024
    float64 per form, and the likelihood ratios on tilted draws), the rerun starts at block 2
    and its curve is the uninterrupted one bitwise; the checkpoint is removed at the end."""
    x, sigmas = digits.x[:400], [0.3, 1.0, 4.0]
    est = make_estimator("gram", 400, inner=8)
    kw = dict(outer=3500, seed=3, progress=False, draws=draws, conditional=True,
              labels=digits.labels[:400])  # fmt: skip
    ref = estimate_curve(x, sigmas, est, **kw)
    ckpt = tmp_path / "curve.partial"
    real_add = sweep_module._Blocks.add

    def interrupted(self, block, *a):
        real_add(self, block, *a)
        if block == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module._Blocks, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        estimate_curve(x, sigmas, est, checkpoint=ckpt, **kw)
    done = json.loads(ckpt.read_text())["done"]
    assert sorted(n.rsplit(" ", 1)[1] for n in done) == ["0", "1"]  # blocks, no points yet
    forms = ("closed", "direct", "ratio") if draws == "tilted" else ("closed", "direct")
    for unit in done.values():
        assert unit["sigma"] == [0, 1, 2]
        for form in forms:
            assert [sweep_module._decode(v).numel() for v in unit[form]] == [1024] * 3
    monkeypatch.setattr(sweep_module._Blocks, "add", real_add)
    real, firsts = sweep_module.outer_blocks, []
    monkeypatch.setattr(sweep_module, "outer_blocks",
                        lambda *a, **k: firsts.append(k["first"]) or real(*a, **k))  # fmt: skip
    resumed = estimate_curve(x, sigmas, est, checkpoint=ckpt, **kw)
    assert firsts == [2]
    assert not ckpt.exists()
    assert without_seconds(resumed.to_json()) == without_seconds(ref.to_json())


@pytest.mark.slow
def test_the_cli_resumes_a_sweep_interrupted_with_sigint(tmp_path):
    """``lossfloor estimate`` (gram, digits, 24 blocks) sent SIGINT once the checkpoint holds a
    finished block: the rerun resumes from it and writes the uninterrupted run's numbers."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out):
        return [sys.executable, "-m", "lossfloor", "estimate", "--data", "digits", "--estimator",
                "gram", "--outer", "24000", "--sigmas", "0.3,1,4", "--seed", "4", "--quiet",
                "--out", str(out)]  # fmt: skip

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(command(tmp_path / "ref.json"), env=env, check=True)
    out = tmp_path / "cut.json"
    partial = tmp_path / "cut.json.partial"
    proc = subprocess.Popen(command(out), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (partial.exists() and "block " in partial.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "no block was saved"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not out.exists() and partial.exists(), err
    blocks = len(json.loads(partial.read_text())["done"])
    assert 1 <= blocks < 24
    subprocess.run(command(out), env=env, check=True)
    ref, cut = (json.loads((tmp_path / n).read_text()) for n in ("ref.json", "cut.json"))
    assert without_seconds(cut)["points"] == without_seconds(ref)["points"]
    assert not partial.exists()


# --- tilted draws ----------------------------------------------------------------------------


@pytest.mark.slow
def test_tilted_draws_sweep_the_grid_and_match_full(digits, monkeypatch):
    sigmas = [0.4, 0.7, 1.0, 2.0, 5.0]
    kw = dict(outer=1797, seed=2, draws="tilted", progress=False)
    full = estimate_curve(digits.x, sigmas, make_estimator("full", 1797), **kw)
    real = estimate_module.per_sample_values
    calls = []
    monkeypatch.setattr(estimate_module, "per_sample_values",
                        lambda *a, **k: calls.append(a[2]) or real(*a, **k))  # fmt: skip
    gram = estimate_curve(digits.x, sigmas, make_estimator("gram", 1797), **kw)
    assert calls == [] and gram.draws == "tilted"
    assert _within(gram, full, 0.03, where=1e-2) >= 4
    assert [p.upper_bound for p in gram.points] == [p.upper_bound for p in full.points]


#: What a point's numbers are, for the sweep's comparisons with gram σ by σ.
NUMBERS = ("optimal_loss", "stderr", "closed", "closed_stderr", "direct", "direct_stderr",
           "combined_weight_closed", "ess", "closed_rounding", "upper_bound")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(draws="plain", conditional=True),
        dict(draws="plain", outer=1024, target_rse=0.03, max_outer=8192),
        dict(draws="plain", conditional=True, outer=1024, target_rse=0.05, max_outer=4096),
        dict(draws="tilted", precision="float64"),
        dict(draws="tilted", precision="float64", conditional=True),
        dict(draws="tilted", precision="float64", outer=1024, target_rse=0.05, max_outer=4096),
    ],
    ids=[
        "conditional",
        "adaptive",
        "conditional-adaptive",
        "tilted",
        "tilted-conditional",
        "tilted-adaptive",
    ],  # fmt: skip
)
def test_the_sweep_is_gram_sigma_by_sigma(digits, kw, monkeypatch):
    """Conditional pools, adaptive sizes and tilted draws in the sweep (``sweep._grid_values``,
    no ``per_sample_values``) give gram's numbers σ by σ: bitwise on plain draws; on tilted
    ones the sweep sums ε·Xᵀ as z·Xᵀ + (x_c − x_s)·Xᵀ/2σ where σ by σ multiplies (z + δ)·Xᵀ,
    so in float64 the values differ by rounding only: relative ~1e-16 × the logits' scale
    (|l|σ² ≲ 1e3 here), far below the 1e-9 asserted (a wrong term would differ at O(1))."""
    x, labels, sigmas = digits.x[:400], digits.labels[:400], [0.2, 0.7, 2.0, 8.0]
    kw = dict(outer=1500, seed=5, progress=False, labels=labels) | kw
    sweep, by_sigma, calls = _swept_and_by_sigma(x, sigmas, kw, monkeypatch)
    assert calls
    if "target_rse" in kw:  # the sizes differ between σ: the sweep's extra draws per σ
        assert len({p.outer for p in sweep.points}) > 1
        assert [p.outer for p in sweep.points] == [p.outer for p in by_sigma.points]
    if kw.get("draws") != "tilted":
        assert without_seconds(sweep.to_json()) == without_seconds(by_sigma.to_json())
        return
    for a, b in zip(sweep.points, by_sigma.points, strict=True):
        for name in NUMBERS:
            u, v = getattr(a, name), getattr(b, name)
            assert (u is None) == (v is None), name
            if u is not None:
                assert u == pytest.approx(v, rel=1e-9, abs=1e-300), (a.sigma, name)


def test_weights_relative_to_the_source_redo_rows_where_other_points_dominate() -> None:
    """Two points far from the source, a query between them at small σ: both are ~e^450 times
    more probable than the source, beyond 2^HIGH_EXPONENT, so weights relative to the source
    would clamp both alike (μ at their midpoint, ‖δ‖² 2.7% high); the row is redone relative to
    its largest logit and the values are full's (the two weights differ by e^5)."""
    from lossfloor.optimal.gram import HIGH_EXPONENT

    points = torch.zeros(3, 4, dtype=torch.float64)
    points[1, 0], points[2, 0], points[2, 1] = 3.0, 3.0, 1.0
    pool = Pool.from_data(points, torch.float64, "cpu")
    sigma = 0.1
    x_t = points[1] + torch.tensor([0.0, 0.45, 0.0, 0.0], dtype=torch.float64)
    sources = torch.tensor([0, 0])
    noise = torch.stack([(x_t - points[0]) / sigma, torch.zeros(4, dtype=torch.float64)])
    over = (x_t - points[0]).pow(2).sum() - (x_t - points[1]).pow(2).sum()
    assert over / (2 * sigma**2) * math.log2(math.e) > HIGH_EXPONENT
    full = make_estimator("full", 3)(pool, sources, noise, sigma, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    gram = Gram(inner=4000)(pool, sources, noise, sigma, gen)
    # row 0: x0 = the source, μ near point 1 (weights e^5 : 1): ‖δ‖² ≈ 9.0, not 9.25
    assert 8.9 < float(full.direct[0]) * 4 < 9.1
    torch.testing.assert_close(gram.direct, full.direct, rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(gram.closed, full.closed, rtol=1e-3, atol=1e-12)

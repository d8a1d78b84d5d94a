"""J*(σ) and the optimal denoiser of Gaussian items N(m_i, diag s_i²) (optimal/mixture.py): the
two exact limits, a two-component quadrature, a float64 brute force of μ, the precision guard,
conditional pools, the CLI and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_latent_data import _cli, _edm_zip, _one_line_error, _raw_latents, _sd_vae

from lossfloor.data import Dataset, load_dataset
from lossfloor.errors import UserError
from lossfloor.optimal import estimate_curve
from lossfloor.optimal.blocks import per_sample_values
from lossfloor.optimal.denoiser import OptimalDenoiser
from lossfloor.optimal.draws import OUTER_BLOCK, OuterPlan, block_noise
from lossfloor.optimal.estimators import Full, declared, make_estimator
from lossfloor.optimal.mixture import MixturePool
from lossfloor.optimal.pool_cache import make_pools
from lossfloor.optimal.precision import choose_dtype
from lossfloor.seeding import Stream

CPU = torch.device("cpu")
U64 = torch.finfo(torch.float64).eps / 2


def _items(n: int, d: int, seed: int, s_lo: float = 0.05, s_hi: float = 1.0):
    """Random float32 means and per-element stds (different for every item and element)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, d, generator=g)
    s = s_lo + (s_hi - s_lo) * torch.rand(n, d, generator=g)
    return m, s


def _dataset(m: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None = None) -> Dataset:
    return Dataset(name="g", x=m.float(), labels=labels, sha256="g", xflip=False, std=s.float())


def brute_mu(x: torch.Tensor, m: torch.Tensor, s: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x] by definition, float64: softmax_i(log N(x; m_i, diag(s_i² + σ²))) (each query's
    own max: torch.softmax) times E[x0 | x, i] = m_i + s_i²/v_i·(x − m_i)."""
    x, m, s = x.double(), m.double(), s.double()
    v = s * s + sigma * sigma
    diff = x[:, None, :] - m[None]
    logp = -0.5 * (diff * diff / v).sum(-1) - 0.5 * torch.log(2 * math.pi * v).sum(-1)
    w = torch.softmax(logp, dim=1)
    return (w[:, :, None] * (m[None] + (s * s / v)[None] * diff)).sum(1)


def _pool_mu(pool: MixturePool, x: torch.Tensor, sigma: float, tile_bytes: int) -> torch.Tensor:
    q = pool.centre(x).to(pool.dtype)
    return pool.uncentre(pool.posterior(pool.accumulate(q, sigma, tile_bytes=tile_bytes), q))


def _draws(plan: OuterPlan, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, ε) of every draw of ``plan`` as the estimate draws them: (seed, COMPONENT, block)
    and (seed, OUTER_NOISE, block)."""
    m = plan.outer
    zs, es = [], []
    for j in range(plan.blocks):
        size = min(m, (j + 1) * OUTER_BLOCK) - j * OUTER_BLOCK
        zs.append(block_noise(plan.seed, j, size, dim, Stream.COMPONENT))
        es.append(block_noise(plan.seed, j, size, dim))
    return torch.cat(zs), torch.cat(es)


# ---------------------------------------------------------------- the pool's μ (brute force)


@pytest.mark.parametrize("sigma", [0.03, 0.3, 1.0, 4.0])
def test_mixture_posterior_mean_equals_the_float64_brute_force(sigma):
    m, s = _items(150, 3, seed=1)
    pool = MixturePool.from_items(m, s, torch.float64, CPU)
    g = torch.Generator().manual_seed(2)
    near = m[:5].double() + 0.5 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    far = torch.tensor([[40.0, -40.0, 40.0]], dtype=torch.float64)  # far from every item
    x = torch.cat([near, far])
    # tile_bytes=1: tiles of 64 keys, so the 150 keys cross three tiles (the running max)
    got = _pool_mu(pool, x, sigma, tile_bytes=1)
    want = brute_mu(x, m, s, sigma)
    # float64 logits err by δ ≤ u·(‖q‖² + 2√(2D)‖q‖R + R²)/v_min·(a few) (the expanded form);
    # a weight's relative error δ moves μ by ≤ 2δ·(the spread of the component means, ≤ ‖q‖+R)
    q2 = pool.centre(x).pow(2).sum(dim=1)
    r = math.sqrt(float((m.double() - m.double().mean(0)).pow(2).sum(1).max()))
    v_min = sigma**2 + float(s.double().min()) ** 2
    delta = 8 * U64 * (q2 + 2 * math.sqrt(6) * q2.sqrt() * r + r * r) / v_min
    bound = 2 * delta * (q2.sqrt() + r) + 1e-13 * (1 + want.abs().amax(dim=1))
    assert ((got - want).abs().amax(dim=1) <= bound).all(), (got - want).abs().amax(dim=1)


def test_the_optimal_denoiser_of_gaussian_items_equals_the_brute_force():
    m, s = _items(40, 6, seed=3)
    den = OptimalDenoiser(_dataset(m.reshape(40, 1, 2, 3), s.reshape(40, 1, 2, 3)),
                          precision="float64")  # fmt: skip
    g = torch.Generator().manual_seed(4)
    x = m[:8].double() + 0.7 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    sig = torch.tensor([0.05, 0.05, 0.2, 0.2, 1.0, 1.0, 3.0, 3.0], dtype=torch.float64)
    out = den(x.reshape(8, 1, 2, 3), sig).reshape(8, 6)
    want = torch.cat([brute_mu(x[i : i + 1], m, s, float(sig[i])) for i in range(8)])
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- the exact limits


def test_zero_stds_give_the_point_estimator_on_the_same_draws():
    """s ≡ 0: the mixture's logits are the point kernel's up to a per-query constant and
    E[x0 | x, i] = m_i, the draws x0 = m + 0·z the points: the same values to rounding."""
    m, _ = _items(30, 4, seed=5)
    zero = torch.zeros_like(m)
    for sigma in (0.05, 0.3, 1.0, 5.0):
        mixed, points = (
            OuterPlan.build(m, None, 500, 7, False, std=std) for std in (zero, None)
        )  # fmt: skip
        pm, pp = make_pools(mixed, torch.float64, CPU), make_pools(points, torch.float64, CPU)
        a = per_sample_values(mixed, Full(), sigma, torch.float64, CPU, pm)
        b = per_sample_values(points, Full(), sigma, torch.float64, CPU, pp)
        # both logits err by ≤ δ (each pool's float64 bound); μ moves by ≤ 4δ·R, so each form
        # by ≤ (2·‖·‖·e + e²)/D with ‖·‖ ≤ 2R (R² = max‖m − x̄‖²)
        r = math.sqrt(pm[0].max_sq)
        e = 4 * (pm[0].logit_error(sigma, torch.float64) + pp[0].logit_error(sigma, torch.float64))
        tol = (2 * 2 * r * e * r + (e * r) ** 2) / 4 + 1e-15
        assert torch.allclose(a.closed, b.closed, rtol=0, atol=tol)
        assert torch.allclose(a.direct, b.direct, rtol=0, atol=tol)


def test_one_component_gives_the_closed_form_per_draw_and_on_average():
    """N = 1: μ(x) = m + s²/v·(x − m), so with x0 = m + s z, x = x0 + σε (per element)
    x0 − μ = σs(σz − sε)/v and μ − m = s²/v·(sz + σε): both forms per draw are these
    closed forms (float64, to 1e-12), and their mean J* = mean(s²σ²/(s² + σ²))."""
    m, s = _items(1, 5, seed=6, s_lo=0.1, s_hi=2.0)
    m, s = m.double(), s.double()
    for sigma in (0.01, 0.3, 1.0, 10.0):
        plan = OuterPlan.build(m.float(), None, 3000, 8, False, std=s.float())
        out = per_sample_values(plan, Full(), sigma, torch.float64, CPU,
                                make_pools(plan, torch.float64, CPU))  # fmt: skip
        z, eps = _draws(plan, 5)
        sf = s.float().double()  # the pool's s (float32 items)
        v = sf * sf + sigma * sigma
        direct = (sigma * sf * (sigma * z - sf * eps) / v).pow(2).mean(dim=1)
        closed = (sf.pow(2).sum() - (sf * sf / v * (sf * z + sigma * eps)).pow(2).sum(1)) / 5
        assert torch.allclose(out.direct, direct, rtol=1e-12, atol=1e-300)
        assert torch.allclose(out.closed, closed, rtol=1e-12, atol=1e-14 * float(closed.max()))
        exact = float((sf * sf * sigma**2 / v).mean())
        curve = estimate_curve(_dataset(m, s), [sigma], outer=3000, seed=8,
                               precision="float64", progress=False)  # fmt: skip
        p = curve.points[0]
        assert p.direct == pytest.approx(float(direct.mean()), rel=1e-12)
        assert abs(p.optimal_loss - exact) <= 4 * p.stderr


def _two_component_reference(m: np.ndarray, s: np.ndarray, sigma: float) -> float:
    """J*(σ) = E_x[Var(x0 | x)] of ½N(m_0, s_0²) + ½N(m_1, s_1²) in one dimension, by the
    trapezoid rule over x on a grid of ±14 standard deviations of the wider component
    (float64): Var(x0 | x) = Σ w_i(s_i²σ²/v_i + E_i²) − (Σ w_i E_i)²."""
    v = s * s + sigma * sigma
    half = 14 * math.sqrt(v.max())
    x = np.linspace(m.min() - half, m.max() + half, 400_001)
    dens = np.exp(-0.5 * (x[:, None] - m) ** 2 / v) / np.sqrt(2 * np.pi * v)  # grid × 2
    p = 0.5 * dens.sum(axis=1)
    w = 0.5 * dens / np.where(p > 0, p, 1.0)[:, None]
    cond = m + s * s / v * (x[:, None] - m)
    var = (w * (s * s * sigma * sigma / v + cond * cond)).sum(1) - (w * cond).sum(1) ** 2
    return float(np.trapezoid(p * var, x))


def test_two_components_agree_with_quadrature_within_four_standard_errors():
    m = np.array([-1.0, 1.5])
    s = np.array([0.3, 0.8])
    ds = _dataset(torch.tensor(m)[:, None], torch.tensor(s)[:, None])
    sigmas = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    curve = estimate_curve(ds, sigmas, outer=20_000, seed=3, precision="float64", progress=False)
    m32, s32 = (a.astype(np.float32).astype(np.float64) for a in (m, s))  # the items' values
    for p in curve.points:
        ref = _two_component_reference(m32, s32, p.sigma)
        assert abs(p.optimal_loss - ref) <= 4 * p.stderr, (p.sigma, p.optimal_loss, ref, p.stderr)


# ---------------------------------------------------------------- precision


def test_auto_switches_to_float64_where_float32_logits_cancel():
    """Two clusters 100 apart, items 0.01 apart within them, s ~ 1e-4, σ = 1e-3: in float32 the
    expanded logits (terms ~‖q‖·‖m‖/v ~ 1e10) lose every digit that tells the items apart. The
    mixture-aware bound sends ``auto`` to float64, whose J* is the one-component value
    mean(s²σ²/v) (the source's component holds the posterior: its neighbours are 10σ away);
    forced float32 is far off."""
    g = torch.Generator().manual_seed(9)
    centre = torch.tensor([[50.0] * 8, [-50.0] * 8])
    m = centre.repeat_interleave(20, dim=0) + 0.01 * torch.arange(20).repeat(2)[:, None]
    s = 1e-4 * (0.5 + 1.5 * torch.rand(40, 8, generator=g))
    ds, sigma = _dataset(m, s), 1e-3
    assert choose_dtype("auto", make_pools(OuterPlan.build(m, None, 2, 0, False, std=s),
                                           torch.float32, CPU), sigma) == torch.float64  # fmt: skip
    run = {p: estimate_curve(ds, [sigma], outer=2000, precision=p, progress=False).points[0]
           for p in ("auto", "float64", "float32")}  # fmt: skip
    sf = s.double()
    exact = float((sf * sf * sigma**2 / (sf * sf + sigma**2)).mean())
    assert run["auto"].dtype == "float64"
    assert run["auto"].optimal_loss == run["float64"].optimal_loss
    assert abs(run["float64"].optimal_loss - exact) <= 4 * run["float64"].stderr + 1e-6 * exact
    assert abs(run["float32"].optimal_loss - exact) > 10 * exact  # the guard is needed


def test_auto_keeps_float32_where_its_logits_suffice():
    m, s = _items(50, 4, seed=10)
    ds = _dataset(m, s)
    a = estimate_curve(ds, [1.0], outer=1000, progress=False).points[0]
    b = estimate_curve(ds, [1.0], outer=1000, precision="float64", progress=False).points[0]
    assert a.dtype == "float32"
    assert a.optimal_loss == pytest.approx(b.optimal_loss, rel=1e-4)


# ---------------------------------------------------------------- conditional


def test_conditional_values_are_each_class_mixture_on_the_same_draws():
    """Per draw: x0 = m + s z of its source, x = x0 + σε, μ by brute force over the source's
    class only, closed = (A_c − ‖μ − x̄_c‖²)/D, direct = ‖x0 − μ‖²/D (A_c, x̄_c of the class)."""
    m, s = _items(24, 3, seed=11)
    labels = torch.arange(24) % 3
    plan = OuterPlan.build(m, labels, 400, 12, True, std=s)
    sigma = 0.4
    out = per_sample_values(plan, Full(), sigma, torch.float64, CPU,
                            make_pools(plan, torch.float64, CPU))  # fmt: skip
    z, eps = _draws(plan, 3)
    m64, s64 = m.double(), s.double()
    x0 = m64[plan.sources] + s64[plan.sources] * z
    x = x0 + sigma * eps
    for c in range(3):
        k = torch.nonzero(labels[plan.sources] == c).flatten()
        cls = labels == c
        mc, sc = m64[cls], s64[cls]
        mu = brute_mu(x[k], mc, sc, sigma)
        centre = mc.mean(0)
        a = float(((mc - centre).pow(2).sum(1) + sc.pow(2).sum(1)).mean())
        closed = (a - (mu - centre).pow(2).sum(1)) / 3
        direct = (x0[k] - mu).pow(2).sum(1) / 3
        assert torch.allclose(out.closed[k], closed, rtol=1e-9, atol=1e-12)
        assert torch.allclose(out.direct[k], direct, rtol=1e-9, atol=1e-12)
    curve = estimate_curve(_dataset(m, s, labels), [sigma], outer=400, seed=12,
                           conditional=True, precision="float64", progress=False)  # fmt: skip
    assert curve.points[0].closed == pytest.approx(float(out.closed.mean()), rel=1e-12)


# ---------------------------------------------------------------- entry points and refusals


def test_the_curve_of_gaussian_items_records_them_and_their_total_variance():
    m, s = _items(20, 4, seed=13)
    curve = estimate_curve(_dataset(m, s), [100.0], outer=2000, precision="float64",
                           progress=False)  # fmt: skip
    assert curve.dataset is not None and curve.dataset["gaussian_items"] is True
    var = float(m.double().var(0, unbiased=False).mean() + s.double().pow(2).mean())
    assert curve.data_variance == pytest.approx(var, rel=1e-12)
    assert curve.draws == "plain"
    p = curve.points[0]  # σ ≫ data: J* → the data variance (means' and within items')
    assert abs(p.optimal_loss - var) <= 4 * p.stderr + 1e-3 * var


def test_cli_estimate_of_an_edm2_latent_zip_equals_the_npz_of_its_final_units(tmp_path, capsys):
    mean, std = _raw_latents(n=12)
    labels = [i % 2 for i in range(12)]
    zpath = _edm_zip(tmp_path / "latents.zip", mean, std, labels)
    fmean, fstd = _sd_vae(mean, std)
    np.savez(tmp_path / "final.npz", mean=fmean, std=fstd, y=np.array(labels))
    common = ["estimate", "--sigmas", "0.05,0.5,5", "--outer", "600", "--quiet"]
    code, _, err = _cli(capsys, *common, "--data", str(tmp_path / "final.npz"),
                        "--out", str(tmp_path / "npz.json"))  # fmt: skip
    assert code == 0, err
    code, _, err = _cli(capsys, *common, "--data", str(zpath), "--encoder", "sd-vae",
                        "--out", str(tmp_path / "zip.json"))  # fmt: skip
    assert code == 0, err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("npz.json", "zip.json"))
    assert [p["optimal_loss"] for p in a["points"]] == [p["optimal_loss"] for p in b["points"]]
    assert a["dataset"]["gaussian_items"] is True
    code, _, err = _cli(capsys, *common, "--data", str(zpath), "--encoder", "sd-vae",
                        "--conditional", "--out", str(tmp_path / "cond.json"))  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--draws", "tilted"], "Gaussian items (VAE latents with a std) take plain draws"),
        (["--estimator", "snis"], "lacks the capability 'gaussian'"),
        (["--estimator", "stratified"], "lacks the capability 'gaussian'"),
        (["--estimator", "gram"], "lacks the capability 'gaussian'"),
    ],
)
def test_cli_refuses_what_gaussian_items_do_not_take_in_one_line(tmp_path, capsys, extra, says):
    mean, std = _raw_latents(n=8)
    np.savez(tmp_path / "g.npz", mean=mean, std=std)
    argv = ["estimate", "--data", str(tmp_path / "g.npz"), "--sigmas", "0.5",
            "--out", str(tmp_path / "c.json"), *extra]  # fmt: skip
    assert says in _one_line_error(capsys, *argv)
    assert not (tmp_path / "c.json").exists()


def test_each_estimators_gaussian_capability_matches_what_it_does():
    m, s = _items(40, 3, seed=14)
    ds = _dataset(m, s)
    for name, caps in declared().items():
        est = make_estimator(name, 40)
        if "gaussian" in caps.items:
            assert caps.refusal("gaussian") is None
            estimate_curve(ds, [0.5], est, outer=100, progress=False)
        else:
            with pytest.raises(UserError, match="lacks the capability .gaussian.") as info:
                estimate_curve(ds, [0.5], est, outer=100, progress=False)
            assert caps.why_not["gaussian"] in str(info.value)


def test_a_path_of_gaussian_items_is_estimated_in_memory(tmp_path):
    mean, std = _raw_latents(n=10)
    np.savez(tmp_path / "g.npz", mean=mean, std=std)
    by_path = estimate_curve(str(tmp_path / "g.npz"), [0.5], outer=200, progress=False)
    by_data = estimate_curve(load_dataset(str(tmp_path / "g.npz")), [0.5], outer=200,
                             progress=False)  # fmt: skip
    assert by_path.points[0].optimal_loss == by_data.points[0].optimal_loss


# ---------------------------------------------------------------- diagnosis


def test_diagnosis_pairs_the_mixture_optimum_with_a_model_on_the_same_component_draws():
    """The optimal denoiser of the Gaussian items, diagnosed on them, has a gap of ~0 (its loss
    and J* on the same x0 = m + s z and ε, up to its float32 inputs); the means-as-points
    denoiser, which ignores the within-item variance, has a gap far above its error at σ below
    the stds."""
    from lossfloor.diagnosis import diagnose

    m, s = _items(30, 4, seed=15, s_lo=0.05, s_hi=0.2)
    ds = _dataset(m, s)
    points = Dataset(name="p", x=m.float(), labels=None, sha256="p", xflip=False)
    sigmas = [0.05, 0.5]
    kw = {"outer": 1024, "progress": False, "cache": False}
    best = diagnose(OptimalDenoiser(ds, precision="float64"), ds, sigmas, **kw)
    means = diagnose(OptimalDenoiser(points, precision="float64"), ds, sigmas, **kw)
    curve = estimate_curve(ds, sigmas, outer=1024, progress=False)
    for b, c in zip(best.points, curve.points, strict=True):
        # float32 inputs round x by ~6e-8·|x|: μ moves by as much, ‖x0 − μ‖² by ≲ 1e-6 of J*
        assert abs(b.gap) <= 1e-5 * b.optimal_loss
        assert b.optimal_loss == pytest.approx(c.direct, rel=1e-5)  # the estimate's draws
    assert means.points[0].gap > 10 * means.points[0].gap_stderr


def test_cli_diagnose_of_gaussian_items_pairs_and_refuses_tilted_draws(tmp_path, capsys):
    mean, std = _raw_latents(n=10)
    np.savez(tmp_path / "g.npz", mean=mean, std=std)
    argv = ["diagnose", "--data", str(tmp_path / "g.npz"), "--model", "optimal", "--sigmas",
            "0.1,1", "--outer", "256", "--quiet", "--no-cache"]  # fmt: skip
    code, _, err = _cli(capsys, *argv, "--out", str(tmp_path / "d.json"))
    assert code == 0, err
    for p in json.loads((tmp_path / "d.json").read_text())["points"]:
        assert abs(p["gap"]) <= 1e-5 * p["optimal_loss"]  # the optimum against itself
    out = str(tmp_path / "t.json")
    assert "take plain draws" in _one_line_error(capsys, *argv, "--draws", "tilted", "--out", out)

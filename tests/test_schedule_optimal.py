"""The optimal-loss schedule (docs/method.md §5): w, p, their sampling, gap sources, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lossfloor import __version__
from lossfloor.diffusion import get_process, get_target
from lossfloor.diffusion.targets import edm_lambda
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal import Curve, CurvePoint
from lossfloor.optimal.analytic import gaussian_optimal_loss, two_point_optimal_loss
from lossfloor.schedules import OptimalLossSchedule, get_schedule
from lossfloor.schedules.optimal import sample_piecewise_linear


def _curve(fn, lo=1e-3, hi=1e3, n=121, dataset=None, variance=None) -> Curve:
    points = tuple(
        CurvePoint(sigma=float(s), optimal_loss=fn(float(s))) for s in np.geomspace(lo, hi, n)
    )
    return Curve(points=points, dataset=dataset, data_variance=variance)


def _two_point(sigma: float) -> float:
    """Two points ±a, ‖a‖ = 2 in 4 dims: J* ≈ 0 below σ ≈ 0.5, → r²/D = 1 above."""
    return max(two_point_optimal_loss(2.0, 4, sigma), 0.0)  # rounding gives −2e-16


TWO_POINT = _curve(_two_point, 1e-2, 1e3, 61, {"sha256": "aa"}, 1.0)


def test_gaussian_data_first_term_is_edms_lambda_with_sigma_data_squared_the_variance():
    v = 0.3
    curve = _curve(lambda s: gaussian_optimal_loss(np.full(8, v), s), variance=v)
    sched = OptimalLossSchedule.from_curve(curve, w_max=1e12, sigma_min=1e-3, sigma_max=1e3)
    nodes = torch.from_numpy(curve.sigmas)
    lam = edm_lambda(nodes, math.sqrt(v))
    torch.testing.assert_close(sched.weight(nodes), lam, rtol=1e-12, atol=0)
    # between nodes ln J* is linear in u = ln σ; ln J* = ln v + 2u − ln(v + e^{2u}) has
    # |d²/du²| = 4v·e^{2u}/(v + e^{2u})² ≤ 1, so the midpoint error of ln J* is ≤ h²/8 (h the
    # ln σ spacing), and ~0 at the small-σ end, where J* ∝ σ² is a power law
    mids = torch.from_numpy(np.sqrt(curve.sigmas[1:] * curve.sigmas[:-1]))
    h = math.log(curve.sigmas[1] / curve.sigmas[0])
    ratio = edm_lambda(mids, math.sqrt(v)) / sched.weight(mids)
    assert float(ratio.log().abs().max()) <= h * h / 8 * (1 + 1e-9)
    # (on the first cell |d²/du²| ≤ 4σ₁²/v, σ₁ its upper end)
    assert abs(math.log(float(ratio[0]))) <= h * h / 8 * 4 * curve.sigmas[1] ** 2 / v


@pytest.mark.slow
def test_weight_is_finite_positive_and_capped_from_1e_minus_3_to_1e3():
    sched = OptimalLossSchedule.from_curve(TWO_POINT, sigma_min=0.01, sigma_max=1e3, bump=0.5)
    s = torch.from_numpy(np.geomspace(1e-3, 1e3, 2001))
    w = sched.weight(s)
    assert torch.isfinite(w).all() and (w > 0).all()
    assert float(w.max()) <= sched.a * sched.cap * (1 + sched.bump) * (1 + 1e-12)
    # above σ* it is 1/J*; below, the cap (plus the bump); the cap is 1/J*(σ*)
    above = s > 2 * sched.star
    j = torch.tensor([_two_point(float(x)) for x in s[above]], dtype=torch.float64)
    # w = 1/J* with ln J* linear in ln σ between the curve's points: the chord's error is at most
    # h²/8·max|d²ln J*/du²| (h the ln σ spacing; the second derivative from second differences
    # of the closed form on a 10× finer grid from σ* up)
    u = np.log(np.geomspace(sched.star, 1e3, 10 * 61))
    lj = np.log([_two_point(float(x)) for x in np.exp(u)])
    curvature = np.abs(np.diff(lj, 2)).max() / (u[1] - u[0]) ** 2
    h = math.log(TWO_POINT.sigmas[1] / TWO_POINT.sigmas[0])
    err = (w[above] * j).log().abs().max()
    assert 0 < float(err) <= h * h / 8 * curvature
    # σ*: the curve's J*(σ*) = τ·Var (the documented rule, τ = 0.01), and w_max = 1/J*(σ*)
    assert float(sched.optimal_loss_at(sched.star)) == pytest.approx(0.01 * 1.0, rel=1e-9)
    assert sched.cap == pytest.approx(1 / (0.01 * 1.0), rel=1e-9)
    assert float(sched.weight(sched.star / 2)) == pytest.approx(
        sched.cap
        * (
            1
            + 0.5
            * math.exp(-0.5 * ((math.log(sched.star / 2) - math.log(sched.star) + 1) / 0.5) ** 2)
        ),
        rel=1e-12,
    )


@pytest.mark.slow
def test_piecewise_linear_sampler_matches_its_density_ks_on_1e5_draws():
    sched = OptimalLossSchedule.from_curve(TWO_POINT, sigma_min=0.01, sigma_max=1e3)
    draws = sched.sample(100_000, torch.Generator().manual_seed(0)).log().numpy()
    # an independent CDF: trapezoid of density_ln_sigma on a 16× finer grid
    u = np.linspace(math.log(0.01), math.log(1e3), 16 * sched.grid + 1)
    q = sched.density_ln_sigma(torch.from_numpy(np.exp(u))).numpy()
    cdf = np.concatenate([[0], np.cumsum(0.5 * np.diff(u) * (q[1:] + q[:-1]))])
    assert cdf[-1] == pytest.approx(1.0, abs=1e-6)  # integrates to 1 over ln σ
    result = stats.kstest(draws, lambda x: np.interp(x, u, cdf))
    assert result.pvalue > 0.01
    # and on a coarse density with steep cells the inverse is exact (sorted quantiles)
    uu = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    qq = torch.tensor([0.0, 2.0, 0.5], dtype=torch.float64)
    x = sample_piecewise_linear(uu, qq, 100_000, torch.Generator().manual_seed(1)).numpy()
    mass = np.array([1.0, 2.5])  # cells' masses: ½·1·2, ½·2·2.5

    def cdf2(t):
        t = np.asarray(t)
        left = np.where(t < 1, t**2, 1 + 2 * (t - 1) - 0.375 * (t - 1) ** 2)
        return np.clip(left, 0, None) / mass.sum()

    assert stats.kstest(x, cdf2).pvalue > 0.01


def test_lognormal_density_keeps_edms_p_and_the_density_integrates_to_one():
    sched = OptimalLossSchedule.from_curve(TWO_POINT, density="lognormal", sigma_min=0.01,
                                           sigma_max=1e3)  # fmt: skip
    u = np.linspace(math.log(0.01), math.log(1e3), 4001)
    q = sched.density_ln_sigma(torch.from_numpy(np.exp(u))).numpy()
    assert np.trapezoid(q, u) == pytest.approx(1.0, abs=1e-6)
    ref = stats.norm.pdf(u, -1.2, 1.2)
    ref /= np.trapezoid(ref, u)
    np.testing.assert_allclose(q, ref, rtol=1e-4, atol=1e-9)


def test_config_round_trip_rebuilds_the_same_schedule_and_draws():
    gap = {"sigma": [0.01, 1.0, 1e3], "value": [0.001, 0.05, 0.01]}
    sched = OptimalLossSchedule.from_curve(TWO_POINT, gap=gap, sigma_min=0.01, sigma_max=1e3,
                                           bump=0.3, exponent=0.5)  # fmt: skip
    again = get_schedule(sched.to_config())
    assert again == sched
    g = torch.Generator()
    assert torch.equal(sched.sample(50, g.manual_seed(3)), again.sample(50, g.manual_seed(3)))
    s = torch.from_numpy(np.geomspace(0.01, 1e3, 50))
    assert torch.equal(sched.density_ln_sigma(s), again.density_ln_sigma(s))


def test_density_is_w_times_gap_to_the_exponent_with_the_gap_floored():
    gap = {"sigma": [0.01, 1.0, 1e3], "value": [-0.01, 0.05, 0.02]}
    sched = OptimalLossSchedule.from_curve(TWO_POINT, gap=gap, sigma_min=0.01, sigma_max=1e3,
                                           exponent=0.5, gap_floor=0.1)  # fmt: skip
    grid = np.array(sched.tabulated().sigma)
    s = torch.from_numpy(grid[[0, 700, 1140, 1700]])
    g_lin = np.interp(np.log(s.numpy()), np.log(gap["sigma"]), gap["value"])
    top = np.interp(np.log(grid), np.log(gap["sigma"]), gap["value"]).max()  # on the grid
    g = np.maximum(g_lin, 0.1 * top)
    expected = (sched.weight(s).numpy() * g) ** 0.5
    got = sched.density_ln_sigma(s).numpy()
    np.testing.assert_allclose(got / got[2], expected / expected[2], rtol=1e-6)


@pytest.mark.slow
def test_online_gap_converges_on_a_synthetic_stream():
    """Losses = J*(σ) + true gap(σ) + noise: the per-bin estimate approaches the true gap."""
    sched = OptimalLossSchedule.from_curve(TWO_POINT, gap="online", sigma_min=0.01,
                                           sigma_max=1e3, bins=8, halflife=20_000.0)  # fmt: skip
    true_gap = lambda s: 0.05 * torch.exp(-0.5 * (s.log() / 2) ** 2)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        s = torch.exp(
            torch.empty(256, dtype=torch.float64).uniform_(math.log(0.01), 6.9, generator=g)
        )
        noise = 0.02 * torch.randn(256, generator=g, dtype=torch.float64)
        sched.observe(s, sched.optimal_loss_at(s) + true_gap(s) + noise)
    edges = sched._bin_edges
    centres = torch.exp(0.5 * (edges[1:] + edges[:-1]))
    est = sched._sum / sched._count
    # each bin averages the true gap over its (uniform in ln σ) width
    u = torch.linspace(0, 1, 201, dtype=torch.float64)
    width_avg = torch.stack([true_gap(torch.exp(a + (b - a) * u)).mean()
                             for a, b in zip(edges[:-1], edges[1:], strict=True)])  # fmt: skip
    torch.testing.assert_close(est, width_avg, atol=2e-3, rtol=0)
    assert sched.gap_at(centres) is not None
    # and the density now follows w·g: largest where w·g is
    q = sched.density_ln_sigma(centres)
    wg = sched.weight(centres) * sched.gap_at(centres)
    assert int(q.argmax()) == int(wg.argmax())


def test_online_state_round_trips_and_other_state_is_refused():
    sched = OptimalLossSchedule.from_curve(TWO_POINT, gap="online", sigma_min=0.01, sigma_max=1e3)
    sched.observe(torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64), torch.full((3,), 0.5))
    again = get_schedule(sched.to_config())
    again.load_state_dict(sched.state_dict())
    s = torch.from_numpy(np.geomspace(0.01, 1e3, 33))
    assert torch.equal(again.density_ln_sigma(s), sched.density_ln_sigma(s))
    with pytest.raises(UserError, match="online gap state"):
        again.load_state_dict({"sum": torch.zeros(3)})
    static = OptimalLossSchedule.from_curve(TWO_POINT, sigma_min=0.01, sigma_max=1e3)
    assert static.state_dict() == {}
    with pytest.raises(UserError, match="no online state"):
        static.load_state_dict(sched.state_dict())


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"sigma_max": 2e3}, "sigma_max"),  # the curve ends at 1e3
        ({"a": 0.0}, "a"),
        ({"a": -1.0}, "a"),
        ({"w_max": 0.0}, "w_max"),
        ({"bump_std": -1.0}, "bump_std"),
        ({"exponent": 0.0}, "exponent"),
        ({"star_threshold": 2.0}, "star_threshold"),  # J* never reaches 2·Var
        ({"density": "uniform"}, "density"),
        ({"gap": {"sigma": [0.1, 10.0], "value": [0.1, 0.1]}}, "gap"),  # does not cover
    ],
)
def test_bad_parameters_are_parameter_errors(params, param):
    with pytest.raises(ParameterError) as info:
        OptimalLossSchedule.from_curve(TWO_POINT, **{"sigma_min": 0.01, "sigma_max": 1e3, **params})
    assert info.value.param == param


def test_below_the_curve_the_cap_extends_exactly_and_support_must_fit_the_process():
    sched = OptimalLossSchedule.from_curve(TWO_POINT, sigma_min=0.002, sigma_max=80.0)
    assert float(sched.weight(0.002)) == sched.cap  # J* ≤ J*(σ_0) = 0: min(1/J*, w_max)
    gauss = _curve(lambda s: gaussian_optimal_loss(np.full(2, 0.3), s), variance=0.3)
    with pytest.raises(ParameterError, match="does not yet bind") as info:
        OptimalLossSchedule.from_curve(gauss, sigma_min=1e-4, w_max=1e9)
    assert info.value.param == "sigma_min"
    OptimalLossSchedule.from_curve(gauss, sigma_min=1e-4, w_max=1e5)  # 1/J*(1e-3) > 1e5: binds
    sched.check(get_process("edm"), get_target("F"), 0.5)
    with pytest.raises(UserError, match="process covers"):
        sched.check(get_process("ve"), get_target("eps"), 0.5)  # VE: [0.01, 50]


def test_a_diagnosis_of_another_dataset_is_refused():
    from lossfloor.diagnosis import Diagnosis, GapPoint

    pts = tuple(GapPoint(sigma=s, model_loss=0.1, model_loss_stderr=0.0, optimal_loss=0.0,
                         optimal_loss_stderr=0.0, gap=0.1, gap_stderr=0.0, seconds=0.0)
                for s in (0.01, 1.0, 1e3))  # fmt: skip
    other = Diagnosis(points=pts, dataset={"sha256": "bb"}, outer=2, seed=0)
    with pytest.raises(UserError, match="another dataset"):
        other.gap_table(TWO_POINT.dataset)
    same = Diagnosis(points=pts, dataset={"sha256": "aa"}, outer=2, seed=0)
    gap = same.gap_table(TWO_POINT.dataset)
    sched = OptimalLossSchedule.from_curve(TWO_POINT, gap=gap, sigma_min=0.01, sigma_max=1e3)
    assert sched.gap == {"sigma": [0.01, 1.0, 1e3], "value": [0.1, 0.1, 0.1]}


# ----- CLI and training ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_curve(tmp_path_factory):
    """J* of 24 digits (the exact posterior over all of them) on EDM's σ range, as a file."""
    from lossfloor.data import load_dataset
    from lossfloor.optimal import Full
    from lossfloor.optimal.estimate import estimate_curve

    data = load_dataset("digits", limit=24)
    curve = estimate_curve(data, np.geomspace(0.002, 80, 9).tolist(), Full(), outer=48,
                           progress=False)  # fmt: skip
    path = tmp_path_factory.mktemp("curve") / "curve.json"
    curve.save(path)
    return path


@pytest.fixture
def cli(monkeypatch):
    import lossfloor.cli

    monkeypatch.setattr(lossfloor.cli, "SUBCOMMANDS", ["train", "schedule"])
    return lossfloor.cli.main


def _gap_file(path, sha, sigmas=(0.002, 1.0, 80.0)):
    from lossfloor.diagnosis import Diagnosis, GapPoint

    pts = tuple(GapPoint(sigma=s, model_loss=0.1, model_loss_stderr=0.0, optimal_loss=0.0,
                         optimal_loss_stderr=0.0, gap=0.01 * (i + 1), gap_stderr=0.0, seconds=0.0)
                for i, s in enumerate(sigmas))  # fmt: skip
    Diagnosis(points=pts, dataset={"sha256": sha}, outer=2, seed=0).save(path)
    return path


def _power_law_interp(u: np.ndarray, nodes: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Brute force, per point: v0^(1−f)·v1^f in the cell [u0, u1] ∋ u (f = (u − u0)/(u1 − u0)),
    v0 + f·(v1 − v0) where either is 0; end values held."""
    out = []
    for x in np.clip(u, nodes[0], nodes[-1]):
        k = min(max(int(np.searchsorted(nodes, x)), 1), len(nodes) - 1)
        f = (x - nodes[k - 1]) / (nodes[k] - nodes[k - 1])
        v0, v1 = v[k - 1], v[k]
        out.append(v0 ** (1 - f) * v1**f if v0 > 0 and v1 > 0 else v0 + f * (v1 - v0))
    return np.array(out)


@pytest.mark.slow
def test_schedule_cli_writes_the_table_and_plot(tmp_path, cli, digits_curve):
    import json

    sha = Curve.load(digits_curve).dataset["sha256"]
    gap = _gap_file(tmp_path / "gap.json", sha)
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["schedule", "--curve", str(digits_curve), "--gap", str(gap), "--bump", "0.2"]
    assert cli([*argv, "--out", str(out), "--plot", str(plot)]) == 0
    table = json.loads(out.read_text())
    header = {"format": "lossfloor-schedule", "version": 1, "lossfloor_version": __version__}
    assert {k: table.pop(k) for k in header} == header
    assert table.pop("provenance")["command"].startswith("lossfloor schedule --curve ")
    assert set(table) == {"sigma", "log_sigma_density", "weight", "optimal_loss", "gap", "params"}
    u = np.log(table["sigma"])
    assert np.trapezoid(table["log_sigma_density"], u) == pytest.approx(1.0, abs=1e-12)
    assert table["params"]["bump"] == 0.2 and table["params"]["gap"] == "table"
    assert min(table["gap"]) > 0 and plot.read_bytes()[:4] == b"\x89PNG"
    from lossfloor.diagnosis import Diagnosis

    curve = Curve.load(digits_curve)
    api = OptimalLossSchedule.from_curve(curve, Diagnosis.load(gap).gap_table(curve.dataset),
                                         bump=0.2)  # fmt: skip
    assert table == json.loads(json.dumps(api.tabulated().json_fields()))
    curve = Curve.load(digits_curve)
    j = _power_law_interp(u, np.log(curve.sigmas), np.maximum(curve.values, 0))
    cap = table["params"]["resolved"]["w_max"]
    star, mu = table["params"]["resolved"]["sigma_star"], table["params"]["resolved"]["bump_mean"]
    bump = 0.2 * cap * np.exp(-0.5 * ((u - mu) / 0.5) ** 2) * (np.exp(u) < star)
    expected = np.minimum(1 / np.maximum(j, 1e-300), cap) + bump
    np.testing.assert_allclose(table["weight"], expected, rtol=1e-9)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sigma-max", "100"], "--sigma-max 100.0: the optimal-loss curve ends at σ = 80"),
        (["--w-max", "0"], "--w-max 0.0: must be a positive number"),
        (["--exponent", "-1"], "--exponent -1.0: must be a positive number"),
        (["--gap", "OTHER"], "another dataset"),
        (["--gap", "online"], "only while training"),
        ([], None),  # no --curve
    ],
)
def test_schedule_cli_bad_inputs_are_one_line_exit_2(tmp_path, cli, capsys, digits_curve, extra,
                                                     message):  # fmt: skip
    other = str(_gap_file(tmp_path / "other.json", "ff"))
    extra = [other if e == "OTHER" else e for e in extra]
    curve = ["--curve", str(digits_curve)] if message else []
    assert cli(["schedule", *curve, *extra, "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lossfloor: error:")
    assert (message or "required: --curve") in err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.slow
def test_train_cli_optimal_online_resumes_bitwise_with_the_gap_state(tmp_path, cli, digits_curve):
    full, half = tmp_path / "full", tmp_path / "half"
    base = ["train", "--data", "digits", "--limit", "24", "--batch", "8", "--model", "tiny",
            "--warmup", "2", "--no-progress", "--schedule", "optimal", "--curve",
            str(digits_curve), "--gap", "online", "--gap-halflife", "40"]  # fmt: skip
    assert cli([*base, "--run-dir", str(full), "--steps", "6", "--checkpoint-every", "3"]) == 0
    assert cli([*base, "--run-dir", str(half), "--steps", "3"]) == 0
    state = torch.load(half / "checkpoint-latest.pt", weights_only=True)["objective"]
    assert float(state["schedule"]["count"].sum()) > 0
    resume = ["train", "--data", "digits", "--limit", "24", "--no-progress", "--resume"]
    assert cli([*resume, "--run-dir", str(half), "--steps", "6"]) == 0
    a = torch.load(full / "checkpoint-latest.pt", weights_only=True)
    b = torch.load(half / "checkpoint-latest.pt", weights_only=True)
    for key in ("model", "ema", "objective", "rng"):
        assert _equal(a[key], b[key]), key
    import json

    config = json.loads((full / "config.json").read_text())
    assert config["schedule"]["gap"] == "online"
    assert config["schedule"]["optimal_loss"]["sigma"] == Curve.load(digits_curve).sigmas.tolist()


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_train_cli_refuses_a_curve_of_other_data_and_a_curve_without_optimal(
    tmp_path, cli, capsys, digits_curve
):
    base = ["train", "--data", "digits", "--limit", "20", "--steps", "1", "--model", "tiny"]
    assert cli([*base, "--run-dir", str(tmp_path / "r"), "--schedule", "optimal", "--curve",
                str(digits_curve)]) == 2  # fmt: skip
    assert "another dataset than --data" in capsys.readouterr().err
    assert cli([*base, "--run-dir", str(tmp_path / "r"), "--curve", str(digits_curve)]) == 2
    assert "--curve and --gap belong to --schedule optimal" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_online_gap_refuses_a_split_batch():
    """Under data-parallel training each process sees part of the batch; an online gap learnt
    from a part would make the processes' σ draws drift apart, so it is refused."""
    from lossfloor.training.loss import DenoisingLoss

    schedule = OptimalLossSchedule.from_curve(
        TWO_POINT, gap="online", sigma_min=0.01, sigma_max=1e3
    )
    loss = DenoisingLoss(schedule)
    x0 = torch.zeros(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(UserError, match="--gap online"):
        loss(lambda x, s, labels: x, x0, None, g_sigma=g, g_noise=g, part=(0, 4))


def test_optimal_loss_between_points_is_exact_for_a_power_law_and_linear_next_to_a_zero():
    # J* = 3e-4·σ^2.5 on 5 points spanning 10 decades of J* (×1e2.5 per step): ln J* is
    # linear in ln σ, so the interpolation is exact (float64 rounding) anywhere between them
    nodes = np.geomspace(0.01, 100, 5)
    law = lambda s: 3e-4 * s**2.5  # noqa: E731
    points = tuple(CurvePoint(sigma=float(s), optimal_loss=law(s)) for s in nodes)
    sched = OptimalLossSchedule.from_curve(Curve(points=points, data_variance=30.0),
                                           sigma_min=0.01, sigma_max=100)  # fmt: skip
    s = torch.from_numpy(np.geomspace(0.01, 100, 997))
    torch.testing.assert_close(sched.optimal_loss_at(s), law(s), rtol=1e-12, atol=0)
    # σ*: where the power law reaches τ·Var = 0.3, in closed form
    assert sched.star == pytest.approx((0.3 / 3e-4) ** (1 / 2.5), rel=1e-12)
    # a cell with J* = 0 at one end stays linear in ln σ (a power law cannot reach 0)
    zero = (CurvePoint(sigma=0.01, optimal_loss=0.0), *points[1:])
    sched = OptimalLossSchedule.from_curve(Curve(points=zero, data_variance=30.0),
                                           sigma_min=0.01, sigma_max=100, w_max=1e6)  # fmt: skip
    mid = math.sqrt(nodes[0] * nodes[1])
    assert float(sched.optimal_loss_at(mid)) == pytest.approx(0.5 * law(nodes[1]), rel=1e-12)


def test_coarse_warning_fires_on_the_issues_12_point_grid_not_on_32_points():
    """Two points ±a in 4 dims on 0.05..80: 12 points (the issue's grid) put J* = 0.0096 and
    0.24 next to each other above the cap (×25), 32 points never more than ×10."""
    from lossfloor.schedules.optimal import COARSE_RATIO

    coarse = OptimalLossSchedule.from_curve(
        _curve(_two_point, 0.05, 80, 12, variance=1.0), sigma_min=0.05, sigma_max=80
    )
    ((lo, hi, ratio),) = coarse.coarse()
    assert (lo, hi) == pytest.approx((0.7313, 1.4302), rel=1e-4) and ratio > COARSE_RATIO
    assert "0.731→1.43" in coarse.coarse_warning()
    fine = OptimalLossSchedule.from_curve(
        _curve(_two_point, 0.05, 80, 32, variance=1.0), sigma_min=0.05, sigma_max=80
    )
    assert fine.coarse() == [] and fine.coarse_warning() is None


def test_schedule_cli_warns_on_a_coarse_curve(tmp_path, cli, capsys):
    path = tmp_path / "curve.json"
    _curve(_two_point, 0.05, 80, 12, {"sha256": "aa"}, 1.0).save(path)
    argv = ["schedule", "--curve", str(path), "--sigma-min", "0.05", "--out"]
    assert cli([*argv, str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lossfloor: warning: --curve")
    assert "too coarse" in err[0]


def test_schedule_notes_come_from_the_first_process_only(tmp_path, cli, capsys, monkeypatch):
    """Under torchrun every process builds the schedule (``train``); only RANK 0 says so."""
    path = tmp_path / "curve.json"
    _curve(_two_point, 0.05, 80, 12, {"sha256": "aa"}, 1.0).save(path)
    argv = ["schedule", "--curve", str(path), "--sigma-min", "0.05", "--out"]
    monkeypatch.setenv("RANK", "1")
    assert cli([*argv, str(tmp_path / "s1.json")]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli([*argv, str(tmp_path / "s0.json")]) == 0
    assert "too coarse" in capsys.readouterr().err

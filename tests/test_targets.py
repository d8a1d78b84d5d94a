"""Prediction targets: conversions from/to x0 and loss factors, checked against definitions."""

import json
import math

import numpy as np
import pytest
import torch

from lossfloor.diffusion import (
    EDMF,
    PROCESS_NAMES,
    TARGET_ALIASES,
    TARGET_NAMES,
    VPV,
    X0,
    Epsilon,
    FlowMatching,
    Score,
    Velocity,
    VPDiscrete,
    edm_c_in,
    edm_c_noise,
    edm_c_out,
    edm_c_skip,
    edm_lambda,
    get_process,
    get_target,
)
from lossfloor.errors import UserError

F64 = torch.float64
pytestmark = pytest.mark.numerics

SIGMA_DATA = 0.5
PROCESSES = [get_process(n) for n in PROCESS_NAMES if n != "vp-discrete"] + [
    VPDiscrete(torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))))
]
VP_PROCESSES = [p for p in PROCESSES if p.name.startswith("vp")]
TARGETS = [get_target(n, SIGMA_DATA) for n in TARGET_NAMES]


def draw(p, n=64, d=16, seed=0):
    """t over p's range (ends included), x0 ∈ [−1, 1], ε, x_t and x̂0 = x0 + δ, |δ| ∈ [½, 1½]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=F64)
    u[:2] = torch.tensor([0.0, 1.0])
    if p.t_min > 0:  # log-uniform, so small t is well represented
        t = torch.exp(math.log(p.t_min) + u * (math.log(p.t_max) - math.log(p.t_min)))
    else:
        t = p.t_min + u * (p.t_max - p.t_min)
    t = t.clamp(p.t_min, p.t_max)
    x0 = 2 * torch.rand(n, d, generator=g, dtype=F64) - 1
    eps = torch.randn(n, d, generator=g, dtype=F64)
    x_t = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps
    sign = torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0).to(F64)
    delta = sign * (0.5 + torch.rand(n, d, generator=g, dtype=F64))
    return t, x0, eps, x_t, x0 + delta


def true_target(name, x0, eps, t, p):
    """Each target's value from its definition in terms of (x0, ε)."""
    alpha, sigma = p.alpha(t)[:, None], p.sigma(t)[:, None]
    if name == "x0":
        return x0
    if name == "eps":
        return eps
    if name == "score":
        return -eps / sigma
    if name == "sigma-score":  # σ·score: EDM's VEPrecond output
        return -eps
    if name == "velocity":
        return p.alpha_dot(t)[:, None] * x0 + p.sigma_dot(t)[:, None] * eps
    if name == "v":
        return alpha * eps - sigma * x0
    assert name == "F"
    s = sigma / alpha  # x = x0 + σ̃ε; F = (x0 − c_skip·x)/c_out, EDM's formulas written out
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s * SIGMA_DATA / torch.sqrt(s**2 + SIGMA_DATA**2)
    return (x0 - c_skip * (x0 + s * eps)) / c_out


def expected_factor(name, t, p):
    """The loss-factor table of docs/method.md §1, in α, σ, α̇, σ̇."""
    alpha, sigma = p.alpha(t), p.sigma(t)
    s = sigma / alpha
    return {
        "x0": torch.ones_like(t),
        "eps": alpha**2 / sigma**2,
        "score": alpha**2 / sigma**4,
        "sigma-score": alpha**2 / sigma**2,
        "velocity": (p.alpha_dot(t) - p.sigma_dot(t) * alpha / sigma) ** 2,
        "v": (alpha**2 / sigma + sigma) ** 2,
        "F": (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2,
    }[name]


def assert_close_per_sample(actual, expected, rtol):
    """|actual − expected| ≤ rtol·max|expected| over each sample's row."""
    scale = expected.abs().amax(dim=1, keepdim=True)
    err = ((actual - expected).abs() / scale).max().item()
    assert err <= rtol, err


CASES = [(p, tg) for p in PROCESSES for tg in TARGETS]
IDS = [f"{p.name}-{tg.name}" for p, tg in CASES]


@pytest.mark.parametrize(("p", "target"), CASES, ids=IDS)
def test_target_loss_over_loss_factor_is_x0_loss_per_element(p, target):
    t, x0, eps, x_t, x0_hat = draw(p)
    pred = target.from_x0(x0_hat, x_t, t, p)
    true = true_target(target.name, x0, eps, t, p)
    factor = target.loss_factor(t, p)
    assert factor.shape == t.shape
    x0_loss = (x0_hat - x0) ** 2
    torch.testing.assert_close((pred - true) ** 2 / factor[:, None], x0_loss, rtol=1e-10, atol=0)
    per_sample = ((pred - true) ** 2).mean(1) / factor
    torch.testing.assert_close(per_sample, x0_loss.mean(1), rtol=1e-10, atol=0)


@pytest.mark.parametrize(("p", "target"), CASES, ids=IDS)
def test_from_x0_of_the_true_x0_is_the_defined_target(p, target):
    t, x0, eps, x_t, _ = draw(p, seed=1)
    assert_close_per_sample(
        target.from_x0(x0, x_t, t, p), true_target(target.name, x0, eps, t, p), 1e-10
    )


@pytest.mark.parametrize(("p", "target"), CASES, ids=IDS)
def test_to_x0_inverts_from_x0(p, target):
    t, _, _, x_t, x0_hat = draw(p, seed=2)
    back = target.to_x0(target.from_x0(x0_hat, x_t, t, p), x_t, t, p)
    assert_close_per_sample(back, x0_hat, 1e-10)


@pytest.mark.parametrize(("p", "target"), CASES, ids=IDS)
def test_loss_factor_matches_the_closed_form_table(p, target):
    t = draw(p)[0]
    torch.testing.assert_close(
        target.loss_factor(t, p), expected_factor(target.name, t, p), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_eps_and_F_factors_depend_only_on_sigma_ve(p):
    t = draw(p)[0]
    s = p.sigma_ve(t)
    torch.testing.assert_close(Epsilon().loss_factor(t, p), 1 / s**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(EDMF().loss_factor(t, p), edm_lambda(s), rtol=1e-12, atol=0)


def test_rectified_flow_velocity_factor_is_one_over_t_squared():
    p = FlowMatching()
    t = torch.tensor([1e-5, 0.01, 0.25, 0.5, 0.9, 0.999], dtype=F64)
    torch.testing.assert_close(Velocity().loss_factor(t, p), 1 / t**2, rtol=1e-14, atol=0)
    assert Velocity().loss_factor(0.5, p).item() == 4.0


@pytest.mark.parametrize("p", VP_PROCESSES, ids=lambda p: p.name)
def test_vp_v_factor_is_one_over_sigma_squared(p):
    t = draw(p)[0]
    torch.testing.assert_close(VPV().loss_factor(t, p), 1 / p.sigma(t) ** 2, rtol=1e-13, atol=0)


def test_score_factor_on_ve_is_one_over_sigma_to_the_fourth():
    p = get_process("ve")
    assert Score().loss_factor(2.0, p).item() == 1 / 16
    assert X0().loss_factor(2.0, p).item() == 1.0


# EDM preconditioning, σ_d = 0.5, computed by hand from the formulas:
# σ² + σ_d² = 0.250004 (σ = 0.002), 0.5 (σ = 0.5), 6400.25 (σ = 80).
EDM_TABLE = [
    # σ, c_skip, c_out, c_in, λ
    (0.002, 0.25 / 0.250004, 0.001 / math.sqrt(0.250004), 1 / math.sqrt(0.250004), 250004.0),
    (0.5, 0.5, math.sqrt(0.125), math.sqrt(2.0), 8.0),
    (80.0, 0.25 / 6400.25, 40 / math.sqrt(6400.25), 1 / math.sqrt(6400.25), 4.00015625),
]


@pytest.mark.parametrize(("sigma", "c_skip", "c_out", "c_in", "lam"), EDM_TABLE)
def test_edm_coefficients_match_hand_computed_values(sigma, c_skip, c_out, c_in, lam):
    assert edm_c_skip(sigma, 0.5).item() == pytest.approx(c_skip, rel=1e-14)
    assert edm_c_out(sigma, 0.5).item() == pytest.approx(c_out, rel=1e-14)
    assert edm_c_in(sigma, 0.5).item() == pytest.approx(c_in, rel=1e-14)
    assert edm_lambda(sigma, 0.5).item() == pytest.approx(lam, rel=1e-14)
    assert edm_c_noise(sigma).item() == pytest.approx(0.25 * math.log(sigma), rel=1e-14)


def test_edm_coefficients_with_unit_sigma_data():
    assert edm_c_skip(1.0, 1.0).item() == 0.5
    assert edm_c_out(1.0, 1.0).item() == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert edm_c_in(1.0, 1.0).item() == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert edm_lambda(1.0, 1.0).item() == 2.0


SIGMAS = torch.logspace(-3, 2.5, 57, dtype=F64)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0, 0.2])
def test_edm_coefficient_identities(sigma_data):
    s, sd = SIGMAS, sigma_data
    c_skip, c_out = edm_c_skip(s, sd), edm_c_out(s, sd)
    c_in, lam = edm_c_in(s, sd), edm_lambda(s, sd)
    one = torch.ones_like(s)
    torch.testing.assert_close(c_in**2 * (s**2 + sd**2), one, rtol=1e-14, atol=0)
    torch.testing.assert_close(lam * c_out**2, one, rtol=1e-14, atol=0)
    torch.testing.assert_close(c_out**2, s**2 * sd**2 / (s**2 + sd**2), rtol=1e-14, atol=0)

    # F = (x0 − c_skip·x)/c_out has unit variance when Var(x0) = σ_d²:
    # Var(x0 − c·(x0 + σε)) = (1 − c)²σ_d² + c²σ², which c_skip minimises with minimum c_out².
    def effective(c):
        return (1 - c) ** 2 * sd**2 + c**2 * s**2

    torch.testing.assert_close(effective(c_skip), c_out**2, rtol=1e-13, atol=0)
    for dc in (-1e-3, 1e-3):
        assert bool((effective(c_skip + dc) > effective(c_skip)).all())
    assert bool((c_in > 0).all()) and bool((c_out > 0).all())


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.002, 0.5, 3.0, 80.0])
def test_edm_input_and_target_have_unit_variance_by_monte_carlo(sigma):
    g = torch.Generator().manual_seed(7)
    n = 400_000
    x0 = SIGMA_DATA * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(F64)
    eps = torch.randn(n, generator=g, dtype=F64)
    x = x0 + sigma * eps
    x_in = edm_c_in(sigma, SIGMA_DATA) * x
    F = (x0 - edm_c_skip(sigma, SIGMA_DATA) * x) / edm_c_out(sigma, SIGMA_DATA)
    # standard error of a sample second moment here ≤ √(2/n) ≈ 0.0022
    assert abs(x_in.pow(2).mean().item() - 1) < 0.01
    assert abs(F.pow(2).mean().item() - 1) < 0.01


def test_F_uses_edm_c_noise_whatever_the_process_and_others_use_the_process_c_noise():
    t = torch.tensor([0.1, 0.5], dtype=F64)
    for p in PROCESSES:
        tp = t * p.t_max
        torch.testing.assert_close(
            EDMF().c_noise(tp, p), 0.25 * torch.log(p.sigma_ve(tp)), rtol=1e-15, atol=0
        )
        for target in (X0(), Epsilon(), Score(), Velocity(), VPV()):
            assert torch.equal(target.c_noise(tp, p), p.c_noise(tp))


def test_conversions_keep_float32_and_take_scalar_t():
    p, target = get_process("vp-linear"), Epsilon()
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    x_t = torch.randn(3, 2, 4, 4)
    out = target.from_x0(x0, x_t, 0.5, p)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    per_sample = target.from_x0(x0, x_t, torch.full((3,), 0.5), p)
    torch.testing.assert_close(out, per_sample, rtol=0, atol=0)
    expected = (x_t - p.alpha(0.5).float() * x0) / p.sigma(0.5).float()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert target.to_x0(out, x_t, 0.5, p).dtype == torch.float32


def test_get_target_names_and_aliases():
    for name in TARGET_NAMES:
        assert get_target(name).name == name
    assert isinstance(get_target("epsilon"), Epsilon)
    assert isinstance(get_target("flow"), Velocity)
    assert isinstance(get_target("edm"), EDMF) and isinstance(get_target("f"), EDMF)
    assert isinstance(get_target("EPS"), Epsilon)
    assert get_target("F", sigma_data=1.0).sigma_data == 1.0
    assert set(TARGET_ALIASES.values()) <= set(TARGET_NAMES)


def test_get_target_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as info:
        get_target("noise")
    message = str(info.value)
    assert "'noise'" in message
    for name in [*TARGET_NAMES, *TARGET_ALIASES]:
        assert name in message


@pytest.mark.parametrize("sigma_data", [0.0, -1.0, math.inf, math.nan])
def test_F_rejects_bad_sigma_data(sigma_data):
    with pytest.raises(UserError, match="sigma_data"):
        get_target("F", sigma_data=sigma_data)


def test_to_config_is_json():
    for target in TARGETS:
        assert json.loads(json.dumps(target.to_config()))["name"] == target.name
    assert EDMF(0.7).to_config() == {"name": "F", "sigma_data": 0.7}


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_target_config_round_trip(name):
    t = get_target(name, sigma_data=0.7)
    config = json.loads(json.dumps(t.to_config()))
    assert get_target(config).to_config() == config
    assert get_target(config).to_config()["name"] == name


def test_sigma_data_is_a_parameter_of_F_only():
    assert get_target("F", sigma_data=0.3).to_config() == {"name": "F", "sigma_data": 0.3}
    assert get_target("eps", sigma_data=0.3).to_config() == {"name": "eps"}
    with pytest.raises(UserError, match="sigma_data"):
        get_target("F", sigma_data=-1.0)

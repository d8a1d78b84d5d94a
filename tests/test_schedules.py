"""Noise schedules p(σ), w(σ) and the total optimal loss E_p[w·J*] over a curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from lossfloor.diffusion import (
    PROCESS_NAMES,
    TARGET_NAMES,
    VPEDM,
    Denoiser,
    FlowMatching,
    VPLinear,
    get_process,
    get_target,
)
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal import Total
from lossfloor.optimal.analytic import gaussian_optimal_loss
from lossfloor.schedules import SCHEDULE_NAMES, SCHEDULES, get_schedule
from lossfloor.training import DenoisingLoss

pytestmark = pytest.mark.numerics


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_total_matches_quadrature_of_a_closed_form_curve(name):
    """Gaussian data (v = 0.3): J*(σ) = vσ²/(v+σ²). The total over a 60-point grid against
    scipy's adaptive quadrature of the exact integrand; the stated quadrature error and the
    tail must cover the difference."""
    s = get_schedule(name)
    lo, hi = s.support()
    sig = np.exp(np.linspace(math.log(max(lo, 1e-4)), math.log(min(hi, 1e3)), 60))
    j = np.array([gaussian_optimal_loss(np.array([0.3]), x) for x in sig])
    got = Total.compute(sig, j, np.zeros_like(j), s)

    def f(u: float) -> float:
        x = math.exp(u)
        return float(s.density_ln_sigma(x) * s.weight(x)) * gaussian_optimal_loss(
            np.array([0.3]), x
        )

    exact, _ = integrate.quad(f, math.log(lo), math.log(hi), limit=500, points=[0.0])
    err = abs(got.optimal_loss - exact)
    assert err <= 3 * got.quadrature_error + abs(got.tail) + 1e-6 * exact, (got, exact)
    assert err < 0.01 * exact


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="unknown schedule"):
        get_schedule("cosine-warp")
    with pytest.raises(UserError, match="schedule 'vp'.*beta_max"):
        get_schedule("vp", beta_max=10.0)
    with pytest.raises(ParameterError, match="^p_std = 0"):
        get_schedule("edm", p_std=0)


@pytest.mark.parametrize(
    "params",
    [{"name": n} for n in SCHEDULE_NAMES]
    + [
        {"name": "vp", "beta_min": 0.2, "beta_d": 10.0, "eps_t": 1e-3},
        {"name": "edm", "p_mean": -0.4, "p_std": 1.0, "sigma_data": 0.3},
        {"name": "fm-logit-normal", "m": 0.5, "s": 0.8},
        {"name": "ve", "sigma_min": 0.05, "sigma_max": 20.0},
    ],
)
def test_config_round_trip_rebuilds_the_same_schedule(params):
    schedule = get_schedule(params["name"], **{k: v for k, v in params.items() if k != "name"})
    config = schedule.to_config()
    assert {k: config[k] for k in params} == params  # every given parameter is recorded
    again = SCHEDULES.from_config(config)
    assert again == schedule and again.to_config() == config
    g = torch.Generator()
    draws = [s.sample(5, g.manual_seed(3)) for s in (schedule, again)]
    assert torch.equal(*draws)


def test_sigma_data_goes_to_schedules_that_have_one_unless_they_are_given_one():
    assert get_schedule("edm", sigma_data=0.3).sigma_data == 0.3
    assert get_schedule({"name": "edm", "sigma_data": 0.2}, sigma_data=0.3).sigma_data == 0.2
    assert get_schedule("vp", sigma_data=0.3) == get_schedule("vp")


def test_vp_and_fm_stand_on_their_process_objects():
    """σ̃ = the process's σ̃(t) of the t drawn; the weight is the target's loss factor."""
    vp = get_schedule("vp", beta_min=0.2, beta_d=10.0)
    assert isinstance(vp.process, VPEDM)
    assert vp.process.to_config() == {"name": "vp-edm", "beta_d": 10.0, "beta_min": 0.2}
    u = torch.rand(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = vp.eps_t + (1 - vp.eps_t) * u
    sigma = vp.sample(7, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigma, torch.sqrt(torch.expm1(5.0 * t**2 + 0.2 * t)), rtol=1e-14,
                               atol=0)  # fmt: skip
    t_fm = sigma / (1 + sigma)
    torch.testing.assert_close(get_schedule("fm").weight(sigma), 1 / t_fm**2, rtol=1e-13, atol=0)
    torch.testing.assert_close(vp.weight(sigma), 1 / sigma**2, rtol=1e-13, atol=0)


def _denoiser(process: str, target: str, sigma_data: float = 0.5) -> Denoiser:
    return Denoiser(lambda x, c, labels=None: x, process, target, sigma_data)


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
def test_every_default_process_target_and_schedule_combination_trains_on_finite_losses(schedule):
    """Each default combination passes the consistency check, and its objective gives finite
    per-sample losses equal to w(σ)·loss_x0 at σ drawn from the schedule."""
    objective = DenoisingLoss(get_schedule(schedule, sigma_data=0.5))
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for process in (p for p in PROCESS_NAMES if p != "vp-discrete"):
        for target in TARGET_NAMES:
            denoiser = _denoiser(process, target)
            objective.check(denoiser)  # raises UserError on an inconsistent combination
            g_sigma, g_noise = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
            out = objective(denoiser, x0, None, g_sigma=g_sigma, g_noise=g_noise)
            assert torch.isfinite(out.loss).all() and (out.loss_x0 > 0).all(), (process, target)
            weight = objective.schedule.weight(out.sigma)
            assert torch.equal(out.loss, weight * out.loss_x0), (process, target)


def test_a_schedule_must_match_a_model_process_of_its_family_and_share_sigma_data():
    vp = get_schedule("vp")
    vp.check(VPLinear(0.1, 20.0), get_target("eps"), 0.5)  # the same curve, other parameters
    vp.check(get_process("vp-cosine"), get_target("eps"), 0.5)  # another family: a density
    with pytest.raises(UserError, match="schedule vp draws t of .* give both the same"):
        vp.check(VPLinear(0.1, 10.0), get_target("eps"), 0.5)
    get_schedule("fm").check(FlowMatching(), get_target("velocity"), 0.5)
    edm = get_schedule("edm", sigma_data=0.3)
    edm.check(get_process("edm"), get_target("F", 0.3), 0.3)
    with pytest.raises(UserError, match="schedule edm has sigma_data=0.3 .* model has sigma"):
        edm.check(get_process("edm"), get_target("F", 0.5), 0.5)

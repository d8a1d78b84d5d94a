"""Forward processes: closed forms, inverses, derivatives, names."""

import json
import math

import numpy as np
import pytest
import torch

from lossfloor.diffusion import (
    EDM,
    PROCESS_ALIASES,
    PROCESS_NAMES,
    VE,
    VPEDM,
    FlowMatching,
    VPCosine,
    VPDiscrete,
    VPLinear,
    as_sigma,
    get_process,
)
from lossfloor.errors import UserError

F64 = torch.float64
pytestmark = pytest.mark.numerics

EPS = torch.finfo(F64).eps
# DDPM (Ho et al. 2020): 1000 steps, betas linear from 1e-4 to 0.02, built by hand in numpy.
DDPM_AC = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
PROCESSES = [get_process(n) for n in PROCESS_NAMES if n != "vp-discrete"] + [
    VPDiscrete(torch.from_numpy(DDPM_AC))
]
VP_PROCESSES = [p for p in PROCESSES if p.name.startswith("vp")]


def times(p, n=200):
    """t over the process's whole range: log-spaced (when t_min > 0) and evenly spaced."""
    lin = torch.linspace(p.t_min, p.t_max, n, dtype=F64)
    if p.t_min == 0:
        return lin
    return torch.cat([torch.logspace(math.log10(p.t_min), math.log10(p.t_max), n, dtype=F64), lin])


def five_point(f, t, h):
    """(−f(t+2h) + 8f(t+h) − 8f(t−h) + f(t−2h))/(12h); error O(h⁴·f⁽⁵⁾) + O(ε·|f|/h)."""
    return (-f(t + 2 * h) + 8 * f(t + h) - 8 * f(t - h) + f(t - 2 * h)) / (12 * h)


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_t_to_sigma_ve_to_t_round_trips(p):
    t = times(p)
    torch.testing.assert_close(p.t_of_sigma_ve(p.sigma_ve(t)), t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_sigma_ve_to_t_to_sigma_ve_round_trips(p):
    lo, hi = p.sigma_ve(p.t_min).item(), p.sigma_ve(p.t_max).item()
    s = torch.logspace(math.log10(lo), math.log10(hi), 300, dtype=F64)
    torch.testing.assert_close(p.sigma_ve(p.t_of_sigma_ve(s)), s, rtol=1e-12, atol=0)


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_sigma_ve_is_sigma_over_alpha_and_increasing(p):
    t = torch.linspace(p.t_min, p.t_max, 500, dtype=F64)
    s = p.sigma_ve(t)
    torch.testing.assert_close(s, p.sigma(t) / p.alpha(t), rtol=1e-13, atol=0)
    assert bool((s[1:] > s[:-1]).all())


def derivative_points(p):
    """Interior times with a step h inside one smooth piece (for VPDiscrete: mid-segment)."""
    if isinstance(p, VPDiscrete):
        t = torch.arange(0, 999, 7, dtype=F64) + 0.5
        return t, torch.full_like(t, 0.01)
    t = times(p, 60)
    t = t[(t > p.t_min) & (t < p.t_max * 0.99)]
    return t, 1e-3 * t


@pytest.mark.slow
@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
@pytest.mark.parametrize("which", ["alpha", "sigma"])
def test_derivatives_match_finite_differences(p, which):
    f, df = getattr(p, which), getattr(p, which + "_dot")
    t, h = derivative_points(p)
    fd, exact = five_point(f, t, h), df(t)
    # truncation O(h⁴) ≪ 1e-8 relative; rounding ≤ (18/12)·ε·|f|/h ≈ 3.3e-16·|f|/h
    bound = 1e-8 * exact.abs() + 1e-13 * f(t).abs() / h
    assert bool(((fd - exact).abs() <= bound).all()), ((fd - exact).abs() / bound).max()


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
@pytest.mark.parametrize("which", ["alpha", "sigma"])
def test_derivatives_match_autograd(p, which):
    t, _ = derivative_points(p)
    t = t.clone().requires_grad_(True)
    out = getattr(p, which)(t)  # VE's α = 1 does not depend on t at all
    grad = torch.autograd.grad(out.sum(), t)[0] if out.requires_grad else torch.zeros_like(t)
    # atol: autograd through sigmoid(−λ) has absolute error ~ε·|λ'| where σ̇ itself is tiny
    exact = getattr(p, which + "_dot")(t.detach())
    torch.testing.assert_close(exact, grad, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("p", VP_PROCESSES, ids=lambda p: p.name)
def test_vp_processes_preserve_variance(p):
    t = times(p)
    torch.testing.assert_close(
        p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=2 * EPS
    )


def test_ve_and_edm_have_unit_alpha_and_sigma_equal_t():
    for p in (VE(), EDM()):
        t = times(p)
        assert torch.equal(p.alpha(t), torch.ones_like(t))
        assert torch.equal(p.sigma(t), t) and torch.equal(p.sigma_ve(t), t)
        assert torch.equal(p.t_of_sigma_ve(t), t)
    assert (VE().t_min, VE().t_max, EDM().t_min, EDM().t_max) == (0.02, 100.0, 0.002, 80.0)


def test_c_noise_conventions():
    assert EDM().c_noise(1.0).item() == 0.0
    assert EDM().c_noise(math.exp(4.0)).item() == pytest.approx(1.0, rel=1e-15)
    assert VE().c_noise(2.0).item() == 0.0
    assert VE().c_noise(2 * math.e).item() == pytest.approx(1.0, rel=1e-15)
    for p in (VPLinear(), VPCosine(), VPEDM()):
        assert p.c_noise(1.0).item() == 999.0 and p.c_noise(0.5).item() == 499.5
    assert FlowMatching().c_noise(0.25).item() == 250.0
    assert VPDiscrete(torch.from_numpy(DDPM_AC)).c_noise(17.0).item() == 17.0


def test_vp_linear_matches_ddpm_continuous_alpha_bar():
    p = VPLinear()
    for t in (1e-5, 0.01, 0.3, 0.7, 1.0):
        alpha_bar = math.exp(-0.5 * (20 - 0.1) * t**2 - 0.1 * t)
        assert p.alpha(t).item() ** 2 == pytest.approx(alpha_bar, rel=1e-14)
        assert p.sigma(t).item() ** 2 == pytest.approx(1 - alpha_bar, rel=1e-12)


def test_vp_edm_matches_edm_vp_sigma_and_its_inverse():
    # EDM's VPPrecond: sigma(t) = sqrt(exp(½β_d t² + β_min t) − 1),
    # sigma_inv(σ) = (sqrt(β_min² + 2β_d ln(1 + σ²)) − β_min)/β_d.
    p, beta_d, beta_min = VPEDM(), 19.9, 0.1
    for t in (1e-5, 0.003, 0.1, 0.5, 1.0):
        expected = math.sqrt(math.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)
        assert p.sigma_ve(t).item() == pytest.approx(expected, rel=1e-12)
        assert p.alpha(t).item() == pytest.approx(1 / math.sqrt(1 + expected**2), rel=1e-14)
    for s in (0.002, 0.1, 1.0, 10.0, 80.0):
        expected = (math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + s**2)) - beta_min) / beta_d
        assert p.t_of_sigma_ve(s).item() == pytest.approx(expected, rel=1e-12)


def test_vp_edm_is_vp_linear_with_beta_max_equal_beta_min_plus_beta_d():
    t = times(VPLinear())
    torch.testing.assert_close(VPEDM().sigma_ve(t), VPLinear().sigma_ve(t), rtol=1e-14, atol=0)


def test_vp_cosine_matches_nichol_dhariwal_alpha_bar():
    p, s = VPCosine(), 0.008

    def f(t):
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    for t in (1e-5, 0.1, 0.5, 0.9, 0.999):
        assert p.alpha(t).item() ** 2 == pytest.approx(f(t) / f(0), rel=1e-12)
    # where 1 − ᾱ has no cancellation, σ² = 1 − ᾱ directly
    for t in (0.3, 0.6, 0.999):
        assert p.sigma(t).item() ** 2 == pytest.approx(1 - f(t) / f(0), rel=1e-13)


def test_flow_matching_is_rectified_flow():
    p = FlowMatching()
    t = times(p)
    assert torch.equal(p.alpha(t), 1 - t) and torch.equal(p.sigma(t), t)
    torch.testing.assert_close(p.sigma_ve(t), t / (1 - t), rtol=1e-15, atol=0)
    assert p.sigma_ve(0.5).item() == 1.0 and p.sigma_ve(0.75).item() == 3.0
    assert p.t_of_sigma_ve(1.0).item() == 0.5 and p.t_of_sigma_ve(3.0).item() == 0.75


def test_vp_discrete_matches_hand_built_alphas_cumprod_at_integer_steps():
    p = VPDiscrete(torch.from_numpy(DDPM_AC))
    t = torch.arange(1000, dtype=F64)
    ac = torch.from_numpy(DDPM_AC)
    torch.testing.assert_close(p.alpha(t), ac.sqrt(), rtol=1e-14, atol=0)
    torch.testing.assert_close(p.sigma(t), (1 - ac).sqrt(), rtol=1e-13, atol=0)
    torch.testing.assert_close(p.sigma_ve(t), ((1 - ac) / ac).sqrt(), rtol=1e-13, atol=0)
    torch.testing.assert_close(p.t_of_sigma_ve(((1 - ac) / ac).sqrt()), t, rtol=0, atol=1e-11)
    assert (p.t_min, p.t_max) == (0.0, 999.0)


def test_vp_discrete_interpolates_log_snr_linearly():
    p = VPDiscrete(torch.from_numpy(DDPM_AC))
    lam = np.log(DDPM_AC / (1 - DDPM_AC))
    k = np.arange(0, 999, 10)
    for frac in (0.25, 0.5):
        lam_t = lam[k] + frac * (lam[k + 1] - lam[k])
        alpha_bar = 1 / (1 + np.exp(-lam_t))
        t = torch.from_numpy(k + frac)
        torch.testing.assert_close(p.alpha(t) ** 2, torch.from_numpy(alpha_bar), rtol=1e-13, atol=0)
        torch.testing.assert_close(
            p.sigma_ve(t), torch.from_numpy(np.exp(-lam_t / 2)), rtol=1e-13, atol=0
        )


def test_vp_discrete_takes_diffusers_ddpm_scheduler_alphas():
    diffusers = pytest.importorskip("diffusers")
    ac = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod  # float32
    np.testing.assert_allclose(ac.double().numpy(), DDPM_AC, rtol=2e-5)
    p = VPDiscrete(ac)
    torch.testing.assert_close(
        p.alpha(torch.arange(1000.0)), ac.double().sqrt(), rtol=1e-14, atol=0
    )


@pytest.mark.parametrize(
    "bad",
    [[0.9], [[0.9, 0.5]], [0.9, 0.95, 0.5], [1.0, 0.5], [0.9, 0.0], [0.9, 0.9]],
    ids=["one-step", "2-d", "increasing", "one", "zero", "flat"],
)
def test_vp_discrete_rejects_bad_alphas_cumprod(bad):
    with pytest.raises(UserError, match="alphas_cumprod"):
        VPDiscrete(torch.tensor(bad, dtype=F64))


@pytest.mark.parametrize(
    "make",
    [
        lambda: VE(sigma_min=0),
        lambda: EDM(sigma_min=1.0, sigma_max=0.5),
        lambda: VPLinear(beta_min=1.0, beta_max=1.0),
        lambda: VPEDM(beta_d=0),
        lambda: VPCosine(s=-0.1),
    ],
)
def test_bad_process_parameters_raise_user_error(make):
    with pytest.raises(UserError):
        make()


def test_get_process_names_and_aliases():
    for name in PROCESS_NAMES:
        if name != "vp-discrete":  # the one process without defaults (its ᾱ table)
            assert get_process(name).name == name
    assert isinstance(get_process("vp"), VPLinear) and type(get_process("vp")) is VPLinear
    assert isinstance(get_process("flow"), FlowMatching)
    assert isinstance(get_process("rectified-flow"), FlowMatching)
    assert isinstance(get_process(" EDM "), EDM)
    assert set(PROCESS_ALIASES.values()) <= set(PROCESS_NAMES)


def test_get_process_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as info:
        get_process("ddim")
    message = str(info.value)
    assert "'ddim'" in message
    for name in [*PROCESS_NAMES, *PROCESS_ALIASES]:
        assert name in message


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_config_round_trip_rebuilds_the_same_process(p):
    config = json.loads(json.dumps(p.to_config()))
    q = get_process(config)
    assert type(q) is type(p) and q.to_config() == p.to_config()
    t = torch.linspace(p.t_min, p.t_max, 7, dtype=torch.float64)
    assert torch.equal(q.sigma_ve(t), p.sigma_ve(t))


def test_parameters_reach_the_process_by_name_and_vp_discrete_is_reachable():
    assert get_process("vp", beta_max=10.0).to_config() == VPLinear(0.1, 10.0).to_config()
    d = get_process("vp-discrete", alphas_cumprod=DDPM_AC.tolist())
    assert isinstance(d, VPDiscrete) and torch.equal(d.alphas_cumprod, torch.from_numpy(DDPM_AC))
    with pytest.raises(UserError, match="vp-linear.*beta_d"):
        get_process("vp", beta_d=3.0)
    with pytest.raises(UserError, match="alphas_cumprod"):
        get_process("vp-discrete")


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_to_config_is_json_and_names_the_process(p):
    config = json.loads(json.dumps(p.to_config()))
    assert config["name"] == p.name


def test_to_config_records_parameters():
    assert VE(0.02, 10.0).to_config() == {"name": "ve", "sigma_min": 0.02, "sigma_max": 10.0}
    assert VPLinear(0.2, 10.0).to_config() == {
        "name": "vp-linear",
        "beta_min": 0.2,
        "beta_max": 10.0,
    }
    assert VPEDM().to_config() == {"name": "vp-edm", "beta_d": 19.9, "beta_min": 0.1}
    assert VPCosine().to_config() == {"name": "vp-cosine", "s": 0.008}
    assert VPDiscrete(torch.tensor([0.9, 0.5])).to_config()["alphas_cumprod"] == pytest.approx(
        [0.9, 0.5]
    )


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_methods_take_floats_and_tensors_and_return_float64(p):
    t = 0.5 * (p.t_min + p.t_max)
    for method in ("alpha", "sigma", "alpha_dot", "sigma_dot", "sigma_ve", "c_noise"):
        from_float = getattr(p, method)(t)
        from_f32 = getattr(p, method)(torch.tensor([t], dtype=torch.float32))
        assert from_float.dtype == F64 and from_float.shape == ()
        assert from_f32.dtype == F64 and from_f32.shape == (1,)
    assert p.t_of_sigma_ve(1.0).dtype == F64


def test_as_sigma_broadcasts_per_sample_values():
    x = torch.zeros(3, 2, 4, 4)
    expected = torch.tensor([0.5, 0.5, 0.5]).reshape(3, 1, 1, 1)
    for sigma in (0.5, torch.tensor(0.5), torch.tensor([0.5]), torch.full((1, 1, 1, 1), 0.5)):
        out = as_sigma(sigma, x)
        assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
        assert torch.equal(out, expected)
    per_sample = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    assert torch.equal(as_sigma(per_sample, x, F64), per_sample.reshape(3, 1, 1, 1))
    assert torch.equal(
        as_sigma(per_sample.reshape(3, 1, 1, 1), x), per_sample.float().reshape(3, 1, 1, 1)
    )


@pytest.mark.parametrize("shape", [(2,), (3, 2, 1, 1), (3, 1), (4,)])
def test_as_sigma_rejects_shapes_that_are_not_per_sample(shape):
    with pytest.raises(ValueError, match="per-sample"):
        as_sigma(torch.ones(shape), torch.zeros(3, 2, 4, 4))

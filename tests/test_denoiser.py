"""The Denoiser wrapper: D(x, σ) from any process × target, and EDM's own preconditioners."""

import json
import math

import numpy as np
import pytest
import torch

from lossfloor.diffusion import (
    EDMF,
    PROCESS_NAMES,
    TARGET_NAMES,
    VE,
    VPEDM,
    Denoiser,
    VPDiscrete,
    edm_lambda,
    get_process,
    get_target,
)
from lossfloor.diffusion.denoiser import as_sigma
from lossfloor.errors import UserError

F64 = torch.float64
EPS = torch.finfo(F64).eps
SIGMA_DATA = 0.5
PROCESSES = [get_process(n) for n in PROCESS_NAMES if n != "vp-discrete"] + [
    VPDiscrete(torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))))
]
CASES = [(p, n) for p in PROCESSES for n in TARGET_NAMES]
IDS = [f"{p.name}-{n}" for p, n in CASES]


def draw(p, n=12, seed=0):
    """t log-uniform over p's range (ends included; uniform when t_min = 0), x0, and x = x0 + σ̃ε."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=F64)
    u[:2] = torch.tensor([0.0, 1.0])
    if p.t_min > 0:
        t = torch.exp(math.log(p.t_min) + u * (math.log(p.t_max) - math.log(p.t_min)))
    else:
        t = p.t_min + u * (p.t_max - p.t_min)
    t = t.clamp(p.t_min, p.t_max)
    x0 = 2 * torch.rand(n, 2, 3, 3, generator=g, dtype=F64) - 1
    sigma = p.sigma_ve(t)
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g, dtype=F64)
    return t, sigma, x0, x


def per_sample_error(actual, expected):
    """max |actual − expected| / max|expected| over each sample."""
    scale = expected.abs().flatten(1).amax(1).reshape(-1, 1, 1, 1)
    return ((actual - expected).abs() / scale).max().item()


def toy_net(x_in, c_noise, labels=None):
    """A fixed nonlinear backbone that depends on its input, its noise level and its labels."""
    shift = 0.0 if labels is None else 0.3 * labels.to(x_in.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(1.3 * x_in + 0.01 * c_noise.reshape(-1, 1, 1, 1) + shift) - 0.2 * x_in


@pytest.mark.parametrize(("p", "name"), CASES, ids=IDS)
def test_net_predicting_the_true_target_gives_the_true_x0(p, name):
    t, sigma, x0, x = draw(p)
    target = get_target(name, SIGMA_DATA)
    alpha, sig_t = p.alpha(t).reshape(-1, 1, 1, 1), p.sigma(t).reshape(-1, 1, 1, 1)
    seen = {}

    def net(x_in, c_noise, labels):
        seen.update(x_in=x_in, c_noise=c_noise, labels=labels)
        return target.from_x0(x0, alpha * x, t, p)

    D = Denoiser(net, p, target, sigma_data=SIGMA_DATA)
    assert per_sample_error(D(x, sigma), x0) <= 1e-10
    # the backbone saw x_t/√(α²σ_d² + σ_t²) and the conditioning of the process (F: ¼ ln σ̃)
    c_in = 1 / torch.sqrt(alpha**2 * SIGMA_DATA**2 + sig_t**2)
    assert per_sample_error(seen["x_in"], c_in * alpha * x) <= 1e-14
    expected_c_noise = 0.25 * torch.log(sigma) if name == "F" else p.c_noise(t)
    assert seen["c_noise"].shape == (len(t),) and seen["labels"] is None
    torch.testing.assert_close(seen["c_noise"], expected_c_noise, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("p", "name"), CASES, ids=IDS)
def test_target_of_inverts_the_denoiser(p, name):
    t, sigma, x0, x = draw(p, seed=1)
    outputs = []

    def net(x_in, c_noise, labels):
        outputs.append(toy_net(x_in, c_noise))
        return outputs[-1]

    D = Denoiser(net, p, name, sigma_data=SIGMA_DATA)
    x0_hat = D(x, sigma)
    pred = outputs[0]
    # pred → x̂0 → pred rounds x̂0 = (pred − b·x_t)/a once: error ≲ ε·(|pred| + |a·x̂0| + 2|b·x_t|)
    # (e.g. the score at σ̃ = 1e-5 survives x̂0 only to ~ε/σ̃² relative)
    target, t_back = get_target(name, SIGMA_DATA), p.t_of_sigma_ve(sigma)
    x_t = p.alpha(t_back).reshape(-1, 1, 1, 1) * x
    a, b = (c.reshape(-1, 1, 1, 1) for c in target.coefficients(t_back, p))
    bound = 16 * EPS * (pred.abs() + (a * x0_hat).abs() + 2 * (b * x_t).abs()).flatten(1).amax(1)
    err = (D.target_of(x, sigma, x0_hat) - pred).abs().flatten(1).amax(1)
    assert bool((err <= bound).all()), (err / bound).max()
    expected = target.from_x0(x0, x_t, t_back, p)
    torch.testing.assert_close(D.target_of(x, sigma, x0), expected, rtol=0, atol=0)


@pytest.mark.parametrize("p", PROCESSES, ids=lambda p: p.name)
def test_loss_factor_in_sigma_ve(p):
    _, sigma, _, _ = draw(p)
    torch.testing.assert_close(
        Denoiser(toy_net, p, "eps").loss_factor(sigma), 1 / sigma**2, rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        Denoiser(toy_net, p, "F").loss_factor(sigma), edm_lambda(sigma), rtol=1e-12, atol=0
    )
    assert Denoiser(toy_net, p, "x0").loss_factor(sigma).tolist() == [1.0] * len(sigma)
    assert Denoiser(toy_net, p, "v").loss_factor(1.0).shape == ()


SIGMA_BATCH = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=F64)


@pytest.mark.numerics
def test_matches_edm_precond():
    # EDMPrecond: D = c_skip·x + c_out·F(c_in·x, ¼ ln σ), σ_d = 0.5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 3, 3, generator=g, dtype=F64) * 3
    s = SIGMA_BATCH.reshape(-1, 1, 1, 1)
    c_skip, c_out = 0.25 / (s**2 + 0.25), s * 0.5 / torch.sqrt(s**2 + 0.25)
    c_in, c_noise = 1 / torch.sqrt(s**2 + 0.25), 0.25 * torch.log(SIGMA_BATCH)
    expected = c_skip * x + c_out * toy_net(c_in * x, c_noise)
    actual = Denoiser(toy_net, "edm", "F")(x, SIGMA_BATCH)
    torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.numerics
def test_matches_edm_vp_precond():
    # VPPrecond: D = x − σ·F(x/√(σ² + 1), 999·t(σ)),
    # t(σ) = (√(β_min² + 2β_d ln(1 + σ²)) − β_min)/β_d
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, 3, 3, generator=g, dtype=F64) * 3
    s = SIGMA_BATCH.reshape(-1, 1, 1, 1)
    t = (torch.sqrt(0.1**2 + 2 * 19.9 * torch.log1p(SIGMA_BATCH**2)) - 0.1) / 19.9
    expected = x - s * toy_net(x / torch.sqrt(s**2 + 1), 999 * t)
    actual = Denoiser(toy_net, VPEDM(), "eps", sigma_data=1.0)(x, SIGMA_BATCH)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.numerics
def test_matches_edm_ve_precond():
    # VEPrecond: D = x + σ·F(x, ln(σ/2)); its F is −ε̂, so an ε-prediction net is −F.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 3, 3, generator=g, dtype=F64) * 3
    s = SIGMA_BATCH.reshape(-1, 1, 1, 1)
    expected = x + s * toy_net(x, torch.log(0.5 * SIGMA_BATCH))

    def eps_net(x_in, c_noise, labels):
        return -toy_net(x_in, c_noise, labels)

    actual = Denoiser(eps_net, VE(), "eps", scale_input=False)(x, SIGMA_BATCH)
    torch.testing.assert_close(actual, expected, rtol=1e-13, atol=1e-15)


def test_scale_input_false_feeds_x_t():
    p = get_process("fm")
    seen = {}

    def net(x_in, c_noise, labels):
        seen["x_in"] = x_in
        return torch.zeros_like(x_in)

    x = torch.randn(2, 1, 2, 2, dtype=F64)
    Denoiser(net, p, "velocity", scale_input=False)(x, 3.0)  # σ̃ = 3 ⇒ t = ¾, α = ¼
    torch.testing.assert_close(seen["x_in"], 0.25 * x, rtol=1e-15, atol=0)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["edm", "vp-cosine", "fm"])
def test_sigma_may_be_float_scalar_vector_or_column(name):
    D = Denoiser(toy_net, name, "eps")
    x = torch.randn(3, 2, 3, 3, dtype=F64)
    reference = D(x, 0.7)
    for sigma in (
        torch.tensor(0.7, dtype=F64),
        torch.full((3,), 0.7, dtype=F64),
        torch.full((3, 1, 1, 1), 0.7, dtype=F64),
        torch.tensor([0.7], dtype=F64),
    ):
        assert torch.equal(D(x, sigma), reference)
    per_sample = D(x, torch.tensor([0.7, 2.0, 0.7], dtype=F64))
    assert torch.equal(per_sample[[0, 2]], reference[[0, 2]])
    assert not torch.equal(per_sample[1], reference[1])


@pytest.mark.parametrize(
    ("p", "name"), [(get_process("vp-linear"), "v"), (get_process("edm"), "F")]
)
def test_keeps_float32(p, name):
    D = Denoiser(toy_net, p, name)
    x64 = torch.randn(4, 2, 3, 3, dtype=F64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    out32 = D(x64.float(), sigma)
    assert (
        out32.dtype == torch.float32
        and D.target_of(x64.float(), sigma, out32).dtype == torch.float32
    )
    assert per_sample_error(out32.double(), D(x64, sigma)) <= 1e-5


def test_labels_reach_the_net():
    D = Denoiser(toy_net, "edm", "F")
    x = torch.randn(2, 2, 3, 3)
    labels = torch.tensor([0, 1])
    assert torch.equal(D(x, 1.0, labels)[0], D(x, 1.0)[0])
    assert not torch.equal(D(x, 1.0, labels)[1], D(x, 1.0)[1])


def test_module_net_parameters_are_registered():
    net = torch.nn.Conv2d(2, 2, 1)
    D = Denoiser(lambda x, c, labels: net(x), "edm", "x0")
    assert list(D.parameters()) == []

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x, c_noise, labels=None):
            return self.conv(x)

    D = Denoiser(Backbone(), "edm", "x0")
    assert len(list(D.parameters())) == 2


def test_F_sigma_data_must_agree():
    D = Denoiser(toy_net, "edm", "F", sigma_data=1.0)
    assert isinstance(D.target, EDMF) and D.target.sigma_data == 1.0
    with pytest.raises(UserError, match="sigma_data"):
        Denoiser(toy_net, "edm", EDMF(sigma_data=1.0))
    with pytest.raises(UserError, match="sigma_data"):
        Denoiser(toy_net, "edm", "eps", sigma_data=0.0)


def test_unknown_names_raise_user_error():
    with pytest.raises(UserError, match="unknown process"):
        Denoiser(toy_net, "ddim", "eps")
    with pytest.raises(UserError, match="unknown target"):
        Denoiser(toy_net, "edm", "noise")


def test_to_config_is_json():
    config = json.loads(json.dumps(Denoiser(toy_net, "vp", "v", sigma_data=1.0).to_config()))
    assert config == {
        "process": {"name": "vp-linear", "beta_min": 0.1, "beta_max": 20.0},
        "target": {"name": "v"},
        "sigma_data": 1.0,
        "scale_input": True,
    }


def test_as_sigma_is_exported_here():
    assert as_sigma(0.5, torch.zeros(2, 3)).shape == (2, 1)

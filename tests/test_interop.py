"""Drop-in with EDM: the presets equal EDM's preconditioners (Table 1 of Karras et al. 2022,
written out here), and the wrapper speaks EDM's denoiser protocol."""

from __future__ import annotations

import math

import pytest
import torch

from lossfloor.diffusion import Denoiser, as_denoiser, read_protocol
from lossfloor.errors import UserError

F64 = torch.float64
SIGMAS = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 9, dtype=F64))


class Inner(torch.nn.Module):
    """A random inner network F(x_in, c_noise, class_labels, augment_labels) in float64 that
    depends on every input (EDM's SongUNet/DhariwalUNet signature)."""

    def __init__(self, channels: int = 2, label_dim: int = 0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, dtype=F64)
        self.noise = torch.nn.Linear(1, channels, dtype=F64)
        self.label = torch.nn.Linear(max(label_dim, 1), channels, bias=False, dtype=F64)
        self.augment = torch.nn.Linear(3, channels, bias=False, dtype=F64)
        self.seen: dict[str, torch.Tensor | None] = {}
        self.requires_grad_(False)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = {"x": x, "noise": noise_labels, "labels": class_labels}
        h = self.conv(x) + self.noise(noise_labels.reshape(-1, 1)).reshape(-1, x.shape[1], 1, 1)
        if class_labels is not None:
            h = h + self.label(class_labels.to(x.dtype)).reshape(-1, x.shape[1], 1, 1)
        if augment_labels is not None:
            h = h + self.augment(augment_labels).reshape(-1, x.shape[1], 1, 1)
        return torch.tanh(h) - 0.3 * x


def table1(kind: str, sigma: torch.Tensor, sigma_data: float = 0.5, M: int = 1000):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) of VP, VE and EDM, σ shaped [N, 1, 1, 1]."""
    if kind == "edm":
        d = sigma**2 + sigma_data**2
        return sigma_data**2 / d, sigma * sigma_data / d.sqrt(), 1 / d.sqrt(), sigma.log() / 4
    if kind == "vp":
        beta_d, beta_min = 19.9, 0.1
        t = ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (M - 1) * t
    if kind == "iddpm":  # c_noise = M − 1 − (index of the nearest level)
        u = iddpm_u(M)
        j = (sigma.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(1).reshape(sigma.shape)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (M - 1 - j).to(F64)
    assert kind == "ve"
    return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


def iddpm_u(M=1000, C_1=0.001, C_2=0.008):
    """EDM's iDDPMPrecond levels: u_M = 0, u_{j−1} = √((u_j² + 1)/max(ᾱ_{j−1}/ᾱ_j, C_1) − 1),
    ᾱ_j = sin²(½π j/M/(C_2 + 1)), written out in float64."""
    u = torch.zeros(M + 1, dtype=F64)
    alpha_bar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2  # noqa: E731
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return u


class WithVariance(torch.nn.Module):
    """A random net with 2C outputs: a mean half and a (learned-variance) half."""

    def __init__(self, seed):
        super().__init__()
        self.mean, self.var = Inner(seed=seed), Inner(seed=seed + 100)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        args = (x, noise_labels, class_labels, augment_labels)
        return torch.cat([self.mean(*args), 5 * self.var(*args)], dim=1)


def published(kind, net, x, sigma, labels=None, augment=None, **kw):
    """D = c_skip·x + c_out·F(c_in·x, c_noise) with Table 1's coefficients."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = table1(kind, s, **kw)
    F = net(c_in * x, c_noise.flatten(), labels, augment)[:, : x.shape[1]]  # iDDPM: F[:, :C]
    return c_skip * x + c_out * F


PRESETS = {
    "edm": lambda net, **kw: Denoiser.edm(net, **kw),
    "vp": lambda net, **kw: Denoiser.vp(net, **kw),
    "ve": lambda net, **kw: Denoiser.ve(net, **kw),
    "iddpm": lambda net, **kw: Denoiser.iddpm(net, **kw),
}


@pytest.mark.parametrize("kind", ["edm", "vp", "ve", "iddpm"])
def test_presets_equal_edm_preconditioning(kind):
    seed = {"edm": 1, "vp": 2, "ve": 3, "iddpm": 4}[kind]
    net = WithVariance(seed) if kind == "iddpm" else Inner(seed=seed)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(len(SIGMAS), 2, 4, 4, generator=g, dtype=F64) * 2 - 1
    x = x0 + SIGMAS.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g, dtype=F64)
    D = PRESETS[kind](net)
    expected = published(kind, net, x, SIGMAS)
    actual = D(x, SIGMAS)
    scale = expected.abs().flatten(1).amax(1).reshape(-1, 1, 1, 1)
    assert float(((actual - expected).abs() / scale).max()) < 1e-12
    if kind == "edm":  # σ_d is a parameter of the preset, as of EDMPrecond
        D1 = Denoiser.edm(net, sigma_data=1.0)
        torch.testing.assert_close(
            D1(x, SIGMAS), published(kind, net, x, SIGMAS, sigma_data=1.0), rtol=1e-12, atol=0
        )


def test_vp_preset_takes_edm_parameters_m_and_epsilon_t():
    net = Inner(seed=4)
    D = Denoiser.vp(net, M=500, epsilon_t=1e-3)
    x = torch.randn(len(SIGMAS), 2, 4, 4, dtype=F64)
    torch.testing.assert_close(D(x, SIGMAS), published("vp", net, x, SIGMAS, M=500),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    vp_sigma = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)  # noqa: E731
    assert D.sigma_min == pytest.approx(vp_sigma(1e-3), rel=1e-12)
    assert D.sigma_max == pytest.approx(vp_sigma(1.0), rel=1e-12)


def test_iddpm_preset_rounds_to_its_levels_and_samples_on_them():
    from lossfloor.sampling import sampling_sigmas

    u = iddpm_u()
    D = Denoiser.iddpm(WithVariance(seed=5))
    assert (D.sigma_min, D.sigma_max) == (float(u[999]), float(u[0]))
    s = torch.tensor([0.05, 1.0, 30.0], dtype=F64)
    nearest = u[(s[:, None] - u[None]).abs().argmin(1)]
    assert torch.equal(D.round_sigma(s), nearest)
    assert D.round_sigma(s.float()).dtype == torch.float32
    levels = sampling_sigmas(D, 8)[:-1]  # 80 → max(0.002, u_999), every level one of u
    assert bool(torch.isin(levels, u).all()) and float(levels[-1]) == D.sigma_min
    given = u.float() * 1.01  # a pickle's own (float32) levels are used as given
    D = Denoiser.iddpm(WithVariance(seed=5), levels=given)
    g64 = given.double()
    assert D.sigma_min == float(given[999])
    assert torch.equal(D.round_sigma(s), g64[(s[:, None] - g64).abs().argmin(1)])
    with pytest.raises(UserError, match="1001 decreasing levels"):
        Denoiser.iddpm(WithVariance(seed=5), levels=u[:10])


def test_presets_expose_the_edm_protocol():
    net = Inner()
    edm, vp, ve = Denoiser.edm(net), Denoiser.vp(net), Denoiser.ve(net)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.0, math.inf, 0.5)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * 19.9 * 1e-10 + 1e-6)))
    s = torch.tensor([0.3, 7.0], dtype=F64)
    for D in (edm, vp, ve):
        assert torch.equal(D.round_sigma(s), s)
        p = read_protocol(D, strict=True)
        assert (p.sigma_min, p.sigma_max, p.label_dim) == (D.sigma_min, D.sigma_max, 0)


def test_a_float32_net_runs_in_float32_under_float64_inputs_as_edm_samplers_give():
    net = Inner(seed=9).float()
    D = Denoiser.edm(net)
    x = torch.randn(len(SIGMAS), 2, 4, 4, dtype=F64) * SIGMAS.reshape(-1, 1, 1, 1)
    out = D(x, SIGMAS)
    assert out.dtype == F64 and net.seen["x"].dtype == torch.float32
    s = SIGMAS.reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = table1("edm", s)
    F = net((c_in * x).float(), c_noise.flatten().float()).double()
    torch.testing.assert_close(out, c_skip * x + c_out * F, rtol=1e-12, atol=1e-12)


def test_labels_reach_an_edm_net_one_hot_from_indices_or_rows():
    net = Inner(label_dim=3, seed=5)
    D = Denoiser.edm(net, label_dim=3)
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    sigma = torch.tensor([0.5, 2.0], dtype=F64)
    from_index = D(x, sigma, torch.tensor([2, 0]))
    assert torch.equal(net.seen["labels"], torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=F64))
    one_hot = torch.tensor([[0.0, 0, 1], [1, 0, 0]])
    assert torch.equal(D(x, sigma, one_hot), from_index)
    expected = published("edm", net, x, sigma, one_hot.double())
    torch.testing.assert_close(from_index, expected, rtol=1e-12, atol=0)
    D(x, sigma)  # no labels: EDM's zero rows
    assert torch.equal(net.seen["labels"], torch.zeros(2, 3, dtype=F64))
    with pytest.raises(UserError, match="0..2"):
        D(x, sigma, torch.tensor([3, 0]))


def test_index_nets_get_indices_from_one_hot_rows():
    seen = {}

    def net(x_in, c_noise, labels):
        seen["labels"] = labels
        return torch.zeros_like(x_in)

    D = Denoiser(net, "edm", "F", label_dim=4)
    x = torch.zeros(2, 1, 2, 2)
    D(x, 1.0, torch.tensor([[0.0, 0, 0, 1], [0, 1, 0, 0]]))
    assert seen["labels"].tolist() == [3, 1]
    with pytest.raises(UserError, match="one-hot"):
        D(x, 1.0, torch.tensor([[0.5, 0.5, 0, 0], [0, 1, 0, 0]]))


def test_augment_labels_and_edm_loss_use_the_wrapper_unchanged():
    """EDM's EDMLoss (training/loss.py), written out: it calls
    net(y + n, sigma, labels, augment_labels=augment_labels) and weights by λ(σ)."""
    net = Inner(seed=6)
    D = Denoiser.edm(net)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 2, 4, 4, generator=g, dtype=F64)
    aug = torch.randn(4, 3, generator=g, dtype=F64)
    sigma = (torch.randn(4, 1, 1, 1, generator=g, dtype=F64) * 1.2 - 1.2).exp()
    n = torch.randn(y.shape, generator=g, dtype=F64) * sigma
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    loss = weight * (D(y + n, sigma, None, augment_labels=aug) - y) ** 2
    expected = weight * (published("edm", net, y + n, sigma.flatten(), None, aug) - y) ** 2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    assert not torch.equal(D(y + n, sigma, None, augment_labels=aug), D(y + n, sigma))

    def plain(x_in, c_noise, labels):
        return x_in

    with pytest.raises(UserError, match="augment_labels"):
        Denoiser.edm(plain)(y, sigma, None, augment_labels=aug)


class EDMLikeNet(torch.nn.Module):
    """An object with EDM's protocol and a one-hot label input, as a loaded EDM pickle is."""

    sigma_min, sigma_max, sigma_data, label_dim = 0.02, 100.0, 0.5, 3

    def forward(self, x, sigma, class_labels=None):
        self.labels = class_labels
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma).round(decimals=1)


def test_read_protocol_and_as_denoiser_on_foreign_objects():
    net = EDMLikeNet()
    p = read_protocol(net, strict=True)
    assert (p.sigma_min, p.sigma_max, p.sigma_data, p.label_dim) == (0.02, 100.0, 0.5, 3)
    assert float(p.round_sigma(0.123)) == pytest.approx(0.1)
    D = as_denoiser(net)
    D(torch.zeros(2, 1, 2, 2), torch.ones(2), torch.tensor([1, 2]))
    assert net.labels.tolist() == [[0, 1, 0], [0, 0, 1]]
    plain = read_protocol(lambda x, s, labels=None: x)
    assert (plain.sigma_min, plain.sigma_max, plain.sigma_data) == (0.0, math.inf, None)
    with pytest.raises(UserError, match="sigma_min or sigma_max"):
        read_protocol(lambda x, s: x, strict=True)
    with pytest.raises(UserError, match="not callable"):
        read_protocol(object())


# --- EDM's sampler (Algorithms 1 and 2), written out on the protocol ---------------------------


def edm_reference_sampler(net, latents, labels, randn_like, num_steps, churn=(0, 0, math.inf, 1)):
    """EDM's Algorithm 2 (Heun, churn) on net's protocol, in float64, written from the paper:
    levels clamped to [net.sigma_min, net.sigma_max] and rounded; one noise draw per step."""
    s_churn, s_min, s_max, s_noise = churn
    lo, hi, rho = max(0.002, net.sigma_min), min(80.0, net.sigma_max), 7.0
    i = torch.arange(num_steps, dtype=F64)
    t = (hi ** (1 / rho) + i / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = torch.cat([net.round_sigma(t), torch.zeros(1, dtype=F64)])
    x_next = latents.to(F64) * t[0]
    for k in range(num_steps):
        t_cur, t_next, x_cur = t[k], t[k + 1], x_next
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * s_noise * randn_like(x_cur)
        d_cur = (x_hat - net(x_hat, t_hat.expand(len(x_hat)), labels).to(F64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if k < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next.expand(len(x_hat)), labels).to(F64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def edm_streams(seeds, label_dim=0):
    """EDM generate.py's per-seed streams: torch.Generator().manual_seed(seed mod 2³²); latents
    float32 [C, H, W], then (class-conditional nets) one class index per image."""
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    latents = torch.stack([torch.randn(2, 4, 4, generator=g) for g in gens])
    if label_dim:
        classes = torch.stack([torch.randint(label_dim, size=[], generator=g) for g in gens])
        latents = (latents, torch.eye(label_dim, dtype=F64)[classes])

    def randn_like(x):
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])

    return latents, randn_like


@pytest.mark.parametrize("churn", [None, (30.0, 0.05, 20.0, 1.007)])
def test_generate_equals_edm_sampler_from_the_same_seeds(churn):
    from lossfloor.sampling import Churn, generate

    D = Denoiser.ve(Inner(seed=7))  # range [0.02, 100]: the sampler runs 80 → 0.02
    seeds = [3, 2**32 + 5, 11]
    latents, randn_like = edm_streams(seeds)
    expected = edm_reference_sampler(D, latents, None, randn_like, 6, churn or (0, 0, math.inf, 1))
    options = {} if churn is None else {"churn": Churn(*churn)}
    actual = generate(D, (2, 4, 4), seeds, steps=6, batch=2, dtype=F64, progress=False, **options)
    torch.testing.assert_close(actual, expected.float(), rtol=1e-6, atol=1e-6)
    if churn is not None:  # the churn noise changed the samples
        plain = generate(D, (2, 4, 4), seeds, steps=6, dtype=F64, progress=False)
        assert float((plain - actual).abs().max()) > 1e-3


def test_conditional_generate_draws_edm_classes_before_the_churn_noise():
    from lossfloor.sampling import Churn, generate

    D = Denoiser.edm(Inner(label_dim=4, seed=8), label_dim=4)
    seeds, churn = [0, 1, 2], (5.0, 0.0, math.inf, 1.0)
    (latents, one_hot), randn_like = edm_streams(seeds, label_dim=4)
    expected = edm_reference_sampler(D, latents, one_hot, randn_like, 5, churn)
    actual = generate(D, (2, 4, 4), seeds, steps=5, dtype=F64, progress=False, churn=Churn(*churn))
    torch.testing.assert_close(actual, expected.float(), rtol=1e-6, atol=1e-6)
    given = generate(D, (2, 4, 4), seeds, steps=5, dtype=F64, progress=False,
                     churn=Churn(*churn), labels=one_hot.argmax(1))  # fmt: skip
    assert torch.equal(given, actual)  # the same classes given: the same images


def test_sampler_clamps_to_the_model_range_and_rounds_sigma():
    from lossfloor.sampling import generate, sampling_sigmas

    net = EDMLikeNet()  # range [0.02, 100], round_sigma to one decimal
    s = sampling_sigmas(net, 5)
    assert float(s[0]) == 80.0 and float(s[-1]) == 0 and torch.equal(s, s.round(decimals=1))
    assert float(s[1]) == round(float(sampling_sigmas(Denoiser.ve(Inner()), 5)[1]), 1)
    ve = sampling_sigmas(Denoiser.ve(Inner()), 4)
    assert (float(ve[0]), float(ve[-2])) == (80.0, 0.02)
    vp = sampling_sigmas(Denoiser.vp(Inner()), 4)
    assert (float(vp[0]), float(vp[-2])) == (80.0, 0.002)  # VP's range [0.001, 152] holds it
    assert float(sampling_sigmas(Denoiser.edm(Inner()), 4, sigma_max=200.0)[0]) == 200.0
    with pytest.raises(UserError, match="sigma_min = 0.01: outside the model's range"):
        generate(Denoiser.ve(Inner()), (2, 4, 4), [0], sigma_min=0.01, progress=False)


def test_callback_sees_every_step_like_k_diffusion():
    from lossfloor.sampling import Churn, generate

    seen = []
    generate(Denoiser.edm(Inner()), (2, 4, 4), [0, 1], steps=4, dtype=F64, progress=False,
             churn=Churn(S_churn=10.0), callback=seen.append)  # fmt: skip
    assert [c["i"] for c in seen] == [0, 1, 2, 3]
    assert all(set(c) == {"x", "i", "sigma", "sigma_hat", "denoised"} for c in seen)
    gamma = min(10.0 / 4, math.sqrt(2) - 1)
    assert all(c["sigma_hat"] == pytest.approx(c["sigma"] * (1 + gamma)) for c in seen)
    assert seen[0]["denoised"].shape == (2, 2, 4, 4)


def test_diagnose_takes_a_foreign_edm_object_with_one_hot_labels():
    from lossfloor.data import load_dataset
    from lossfloor.diagnosis import diagnose

    ds = load_dataset("digits", limit=40)
    net = EDMLikeNet()
    net.label_dim = 10
    result = diagnose(net, ds, [0.5, 3.0], outer=16, conditional=True, use_labels=True,
                      progress=False, cache=False)  # fmt: skip
    assert net.labels.shape[1] == 10 and bool((net.labels.sum(1) == 1).all())
    # D(x) = x/(1 + σ²) on x = x0 + σε: its loss is E‖(x0 + σε)/(1 + σ²) − x0‖² > 0
    assert all(p.model_loss > 0 and p.loss_factor is None for p in result.points)
    with pytest.raises(UserError, match=r"sigmas = 0.01: outside the model's range \[0.02, 100\]"):
        diagnose(net, ds, [0.01, 1.0], outer=16, progress=False)

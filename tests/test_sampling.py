"""EDM Heun/Euler samplers on closed-form denoisers, and the ``sample`` CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import lossfloor.cli
from lossfloor.data import load_dataset
from lossfloor.errors import UserError
from lossfloor.sampling import (
    generate,
    image_grid,
    initial_noise,
    karras_sigmas,
    sample_euler,
    sample_heun,
)
from lossfloor.training import TrainConfig, train

SIGMA_MAX = 80.0


pytestmark = pytest.mark.usefixtures("one_thread")


def optimal_denoiser(points: torch.Tensor):
    """Exact posterior mean of the empirical distribution (float64):
    μ(x) = Σ_n softmax_n(−‖x − x_n‖²/2σ²)·x_n."""

    def denoise(x, sigma, labels=None):
        d2 = torch.cdist(x.flatten(1), points.flatten(1)).square()
        w = torch.softmax(-d2 / (2 * sigma.view(-1, 1) ** 2), dim=1)
        return (w @ points.flatten(1)).view_as(x)

    return denoise


def gaussian_denoiser(m: torch.Tensor, v: float):
    """Posterior mean for x0 ~ N(m, v·I): D(x, σ) = m + v/(v + σ²)·(x − m)."""

    def denoise(x, sigma, labels=None):
        return m + v / (v + sigma.view(-1, *[1] * (x.ndim - 1)) ** 2) * (x - m)

    return denoise


def test_karras_sigmas_endpoints_and_formula():
    s = karras_sigmas(18)
    assert len(s) == 19 and s.dtype == torch.float64
    assert s[0] == 80.0 and s[17] == 0.002 and s[18] == 0.0
    assert bool((s[1:] < s[:-1]).all())
    i, rho = 5, 7.0
    expected = (80 ** (1 / rho) + i / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert float(s[i]) == pytest.approx(expected, rel=1e-12)
    assert karras_sigmas(1).tolist() == [80.0, 0.0]
    with pytest.raises(UserError):
        karras_sigmas(0)


def test_heun_on_the_optimal_denoiser_of_a_tiny_set_returns_training_points():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_T = initial_noise(range(64), (1, 4, 4), SIGMA_MAX)
    out = sample_heun(optimal_denoiser(points), x_T, karras_sigmas(32))
    dist = (out[:, None] - points[None]).flatten(2).norm(dim=2)
    nearest = dist.min(dim=1)
    # the last step returns D(x, 0.002); once x is within O(0.002) of a point its softmax weight
    # is 1 − exp(−O(1/0.002²))·…: the samples are training points to float64 precision
    assert float(nearest.values.max()) < 1e-9
    assert len(set(nearest.indices.tolist())) >= 4  # it samples the set, not one point


@pytest.mark.slow
def test_heun_on_a_gaussian_gives_the_right_mean_and_variance():
    n, d, v = 20_000, 8, 0.25
    m = torch.linspace(-0.5, 0.5, d, dtype=torch.float64).view(1, d)
    g = torch.Generator().manual_seed(1)
    # start from the exact marginal at σ_max, N(m, (v + σ_max²)·I)
    x_T = m + math.sqrt(v + SIGMA_MAX**2) * torch.randn(n, d, generator=g, dtype=torch.float64)
    out = sample_heun(gaussian_denoiser(m, v), x_T, karras_sigmas(128))
    # mean SE = √(v/n) per coordinate (the linear ODE map keeps the mean at m exactly);
    # variance SE ≈ v·√(2/(n·d)) pooled, plus the discretisation bias: 128 Heun steps get the
    # scale √(v/(v+σ_max²)) to < 0.1% (the order test), so the variance to < 0.2%
    mean_err = (out.mean(0) - m.view(-1)).abs().max()
    assert float(mean_err) < 4.5 * math.sqrt(v / n)  # max over 8 coordinates
    var = float(out.var(0, unbiased=True).mean())
    assert abs(var - v) < 4 * v * math.sqrt(2 / (n * d)) + 0.002 * v


def _gaussian_scale_error(sampler, steps: int) -> float:
    """Relative error of the sampler's linear map x_T − m → x_0 − m against the exact ODE
    solution √(v/(v + σ_max²)) (D is linear, so one scalar input gives the map)."""
    m, v = torch.tensor(0.3, dtype=torch.float64), 0.25
    x_T = torch.ones(1, 1, dtype=torch.float64) + m
    scale = float(sampler(gaussian_denoiser(m, v), x_T, karras_sigmas(steps)) - m)
    return abs(scale / math.sqrt(v / (v + SIGMA_MAX**2)) - 1)


def test_heun_is_second_order_and_euler_first_order_on_a_gaussian():
    heun = [_gaussian_scale_error(sample_heun, n) for n in (32, 64, 128)]
    euler = [_gaussian_scale_error(sample_euler, n) for n in (32, 64, 128)]
    for h, e in zip(heun, euler, strict=True):
        assert h < e  # at equal steps Heun is more accurate
    for a, b in zip(heun[:-1], heun[1:], strict=True):
        assert 3.2 < a / b < 5.0  # doubling the steps divides the error by ≈ 4
    for a, b in zip(euler[:-1], euler[1:], strict=True):
        assert 1.7 < a / b < 2.3  # … and by ≈ 2
    assert heun[-1] < 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deterministic_heun_is_unchanged(dtype):
    """The loop before churn and callbacks existed, written out: same x_T, same levels, D in
    x's dtype ⇒ bitwise the same samples."""
    g = torch.Generator().manual_seed(2)
    points = (torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    D = optimal_denoiser(points)
    x = x_T = (80 * torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)).to(dtype)
    sigmas = karras_sigmas(7).tolist()
    for cur, nxt in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - D(x, torch.full((4,), cur, dtype=dtype))) / cur
        x_next = x + (nxt - cur) * d
        if nxt != 0:
            d2 = (x_next - D(x_next, torch.full((4,), nxt, dtype=dtype))) / nxt
            x_next = x + (nxt - cur) * 0.5 * (d + d2)
        x = x_next
    assert torch.equal(sample_heun(D, x_T, karras_sigmas(7)), x)


def test_edm_latents_are_per_seed_float32_normals():
    # EDM's generate.py: torch.Generator(device).manual_seed(seed % 2**32), randn([C, H, W])
    x_T = initial_noise([4, 2**32 + 9], (1, 3, 3), 80.0)
    for k, seed in enumerate([4, 9]):
        z = torch.randn(1, 3, 3, generator=torch.Generator().manual_seed(seed))
        assert z.dtype == torch.float32 and torch.equal(x_T[k], z.double() * 80.0)


@pytest.mark.numerics
def test_samples_do_not_depend_on_the_batch_size():
    m = torch.zeros(1, 1, 3, 3)
    shape, seeds = (1, 3, 3), list(range(10, 17))
    a = generate(gaussian_denoiser(m, 0.25), shape, seeds, steps=6, batch=3, progress=False)
    b = generate(gaussian_denoiser(m, 0.25), shape, seeds, steps=6, batch=7, progress=False)
    assert torch.equal(a, b)
    c = generate(gaussian_denoiser(m, 0.25), shape, seeds[:1], steps=6, progress=False)
    assert torch.equal(c[0], a[0])


def test_sampler_rejects_an_unordered_sigma_list():
    with pytest.raises(UserError, match="decrease"):
        sample_heun(gaussian_denoiser(torch.zeros(1), 1.0), torch.zeros(2, 1), torch.ones(3))


def test_image_grid_tiles_and_upscales_small_images():
    x = torch.linspace(-1, 1, 5 * 64).view(5, 1, 8, 8)
    img = image_grid(x)  # 3 columns, 2 rows, 8×8 tiles upscaled ×4 to 32×32, 1-px gaps
    assert img.size == (3 * 33 - 1, 2 * 33 - 1) and img.mode == "L"
    arr = np.asarray(img)
    assert arr[0, 0] == 0 and arr[-1, 33 + 31] == 255  # first pixel of tile 0, last of tile 4
    assert (arr[32] == 128).all() and (arr[33:, 66:] == 128).all()  # a gap row, the empty slot
    assert (arr[:32, :32] == arr[0, 0]).sum() == 16  # one 8×8 pixel became a 4×4 block


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = TrainConfig(steps=2, batch=8, model="tiny", conditional=True, warmup=0)
    train(config, load_dataset("digits", limit=24), run_dir, progress=False)
    return run_dir


@pytest.mark.slow
def test_sample_cli_writes_grid_and_npz(conditional_run, tmp_path, monkeypatch):
    monkeypatch.setattr(lossfloor.cli, "SUBCOMMANDS", ["sample"])
    grid, npz = tmp_path / "g.png", tmp_path / "s.npz"
    argv = ["sample", "--run", str(conditional_run), "--n", "5", "--steps", "3", "--seed", "7"]
    argv += ["--labels", "2,4", "--out-grid", str(grid), "--out-npz", str(npz), "--no-progress"]
    assert lossfloor.cli.main(argv) == 0
    with np.load(npz) as f:
        x, y, seeds = f["x"], f["y"], f["seeds"]
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [2, 4, 2, 4, 2] and seeds.tolist() == [7, 8, 9, 10, 11]
    assert Image.open(grid).size == (3 * 33 - 1, 2 * 33 - 1)
    samples = load_dataset(str(npz))  # the samples load back as a dataset
    assert samples.shape == (1, 8, 8) and samples.labels.tolist() == y.tolist()


@pytest.mark.slow
def test_sample_cli_bad_inputs_are_one_line_errors(conditional_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lossfloor.cli, "SUBCOMMANDS", ["sample"])
    out = ["--out-grid", str(tmp_path / "g.png")]
    base = ["sample", "--run", str(conditional_run), "--n", "2"]
    cases = [
        ([*base, *out, "--labels", "12"], "not a class of this model"),
        ([*base, *out, "--labels", "a,b"], "comma-separated integers"),
        (base, "give --out-grid"),
        (["sample", "--run", str(tmp_path / "none"), "--n", "2", *out], "not found"),
    ]
    for argv, message in cases:
        assert lossfloor.cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()

"""Diagnosis: paired gaps, the optimal denoiser as a model, diffusers pipelines, the monitor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lossfloor.cli import main
from lossfloor.data import load_dataset
from lossfloor.diagnosis import diagnose
from lossfloor.models import load_diffusers_pipeline
from lossfloor.optimal import Curve, OptimalDenoiser, estimate_curve, make_estimator
from lossfloor.training.monitor import GapMonitor

#: relative float32 rounding between two evaluation paths of the same μ (the reference works on
#: pre-centred data, the model on raw inputs): ~16 unit round-offs of 6e-8
ROUNDING = 1e-6


@pytest.fixture(scope="module")
def digits300():
    return load_dataset("digits", limit=300)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """J* cache files of these tests go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_gap_of_the_optimal_denoiser_is_zero(tmp_path, capsys):
    out = tmp_path / "d.json"
    rc = main(["diagnose", "--model", "optimal", "--data", "digits", "--limit", "300",
               "--sigmas", "0.05:20:7", "--outer", "600", "--out", str(out),
               "--plot", str(tmp_path / "d.png"), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert len(rec["points"]) == 7
    for p in rec["points"]:
        assert abs(p["gap"]) <= 3 * p["gap_stderr"] + ROUNDING * p["optimal_loss"] + 1e-15, p
    assert (tmp_path / "d.png").stat().st_size > 0


@pytest.mark.slow
def test_a_blurred_denoiser_has_a_positive_gap(digits300):
    """D = μ evaluated at 1.5σ (a wrong noise level): worse than optimal at every σ where J* > 0,
    and the paired standard error resolves it."""
    opt = OptimalDenoiser(digits300)

    def blurred(x, sigma, labels=None):
        return opt(x, sigma * 1.5, labels)

    result = diagnose(blurred, digits300, [0.5, 1.0, 3.0], outer=600, progress=False)
    for p in result.points:
        assert p.gap > 5 * p.gap_stderr > 0
        assert p.model_loss == pytest.approx(p.optimal_loss + p.gap, rel=1e-12)


def test_optimal_denoiser_is_the_estimators_posterior_mean(digits300):
    x0 = digits300.x[:8]
    x = x0 + 0.8 * torch.randn_like(x0)
    mu = OptimalDenoiser(digits300, precision="float64")(x, 0.8)
    flat = digits300.flat().double()
    d2 = ((x.reshape(8, 1, -1).double() - flat[None]) ** 2).sum(-1)
    ref = (torch.softmax(-d2 / (2 * 0.8**2), 1) @ flat).reshape(x.shape)
    torch.testing.assert_close(mu.double(), ref, rtol=0, atol=1e-6)


def test_conditional_optimal_denoiser_stays_in_class(digits300):
    opt = OptimalDenoiser(digits300, conditional=True, precision="float64")
    x = torch.zeros(2, 1, 8, 8)
    labels = torch.tensor([0, 7])
    mu = opt(x, 100.0, labels)  # σ → ∞: the class mean
    for i, c in enumerate(labels.tolist()):
        ref = digits300.x[digits300.labels == c].double().mean(0)
        torch.testing.assert_close(mu[i].double(), ref, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_diffusers_pipeline_is_diagnosed_through_the_wrapper(tmp_path, digits300):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                       norm_num_groups=4)  # fmt: skip
    sched = DDPMScheduler(num_train_timesteps=1000)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    sched.save_pretrained(tmp_path / "pipe" / "scheduler")
    d = load_diffusers_pipeline(tmp_path / "pipe")
    # at the σ of integer timestep 500: D(x) = (x_t − √(1−ᾱ)·ε̂(x_t, 500))/√ᾱ with x_t = √ᾱ·x
    ab = sched.alphas_cumprod[500].double()
    sigma = float(((1 - ab) / ab).sqrt())
    x = digits300.x[:4] + sigma * torch.randn(4, 1, 8, 8)
    xt = (ab.sqrt() * x).float()
    with torch.no_grad():
        eps = unet(xt, torch.full((4,), 500.0)).sample
    ref = (xt - (1 - ab).sqrt().float() * eps) / ab.sqrt().float()
    torch.testing.assert_close(d(x, sigma), ref, rtol=1e-4, atol=1e-4)
    result = diagnose(d, digits300, [0.5, 2.0], outer=64, progress=False)
    assert all(np.isfinite(p.gap) and p.gap_target is not None for p in result.points)


@pytest.mark.slow
def test_monitor_logs_the_gap_from_a_cached_curve(digits300):
    curve = estimate_curve(digits300.x, [0.1, 0.5, 2.0, 10.0], make_estimator("full", 300),
                           progress=False)  # fmt: skip
    curve = Curve.from_json(curve.to_json())
    mon = GapMonitor(curve, digits300, sigmas=[0.5, 2.0], n=128)
    rec: dict = {}
    mon(10, OptimalDenoiser(digits300), rec)
    assert set(rec["gap"]) == {"0.5", "2"}
    # the optimal denoiser's gap on 128 draws is J*_128 − J*: small against J*
    assert abs(rec["gap"]["2"]) < 0.1 * float(curve(2.0))
    mon(20, lambda x, s, labels=None: torch.zeros_like(x), rec)
    assert rec["gap"]["2"] > 0.5 * float(curve(2.0))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/run"], "not found"),
        (["--model", "optimal", "--outer", "1"], "outer"),
        (["--model", "optimal", "--sigmas", "0"], "> 0"),
    ],
)
def test_bad_diagnose_input_is_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    rc = main(["diagnose", "--data", "digits", "--limit", "50", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.slow
def test_trained_model_never_beats_the_floor_and_training_lowers_the_gap(tmp_path, capsys):
    """A tiny seeded run on 200 digits: at every σ the gap is ≥ −3 s.e. (no model beats the
    optimum on its own training set), and 200 more steps lower the gap at intermediate σ."""
    from lossfloor.models import load_run
    from lossfloor.training.loop import TrainConfig, train

    ds = load_dataset("digits", limit=200)
    sigmas = [0.2, 0.5, 1.0, 2.0, 5.0]
    cfg = dict(batch=32, model="tiny", lr=2e-3, warmup=10, ema_halflife=500.0, log_every=50)
    gaps = []
    for steps in (40, 240):
        run = tmp_path / "run"
        train(TrainConfig(steps=steps, **cfg), ds, run, resume=run.exists(), progress=False)
        model, _ = load_run(run)
        result = diagnose(model, ds, sigmas, outer=400, seed=1, progress=False)
        for p in result.points:
            assert p.gap >= -3 * p.gap_stderr, p
        gaps.append({p.sigma: (p.gap, p.gap_stderr) for p in result.points})
    for s in (0.5, 1.0, 2.0):
        (g0, e0), (g1, e1) = gaps[0][s], gaps[1][s]
        assert g1 < g0 - 3 * (e0**2 + e1**2) ** 0.5, (s, gaps)


@pytest.mark.slow
def test_diagnose_rejects_a_checkpoint_of_another_shape(tmp_path, capsys):
    from lossfloor.training.loop import TrainConfig, train

    ds = load_dataset("digits", limit=40)
    train(TrainConfig(steps=2, batch=8, model="tiny", log_every=1), ds, tmp_path / "r",
          progress=False)  # fmt: skip
    npz = tmp_path / "other.npz"
    np.savez(npz, x=np.zeros((10, 12, 12), dtype=np.uint8))
    rc = main(["diagnose", "--model", str(tmp_path / "r"), "--data", str(npz),
               "--sigmas", "1", "--out", str(tmp_path / "o.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists()

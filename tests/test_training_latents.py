"""Training on Gaussian items (VAE latents with a std): x0 = m + s·z drawn afresh at every step
(``training.order.Batches``), reproducible and resumed bitwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import _ckpt, _states_equal

from lossfloor.backbone import UNetBackbone, backbone_config
from lossfloor.cli import main
from lossfloor.data import Dataset, load_dataset
from lossfloor.optimal import estimate_curve
from lossfloor.optimal.denoiser import OptimalDenoiser
from lossfloor.seeding import Stream, generator_for
from lossfloor.training import TrainConfig, train
from lossfloor.training.monitor import GapMonitor
from lossfloor.training.order import Batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _latents(tmp_path: Path, n: int = 12, std_scale: float = 0.3, name: str = "g") -> Dataset:
    """N Gaussian items 4×8×8 (the study's latent shape) read from an .npz of mean and std."""
    rng = np.random.default_rng(0)
    mean = (0.5 * rng.standard_normal((n, 4, 8, 8))).astype(np.float32)
    std = (std_scale * rng.uniform(0.2, 1.0, size=mean.shape)).astype(np.float32)
    np.savez(tmp_path / f"{name}.npz", mean=mean, std=std)
    return load_dataset(str(tmp_path / f"{name}.npz"))


def _loss(record: str) -> float:
    return json.loads(record)["loss"]


def _tiny(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, **{"batch": 8, "model": "tiny", "warmup": 2, **kw})


def test_gaussian_items_draw_m_plus_s_z_afresh_at_every_step(tmp_path):
    ds = _latents(tmp_path, n=8)
    batches = Batches(ds, seed=3, batch=8, conditional=False, device=torch.device("cpu"))
    seen = []
    for step in (0, 1):  # batch = N: every item once per step
        x0, labels = batches.take(step, (0, 8))
        idx = batches.order.indices(step * 8, 8)
        z = torch.randn((8, 4, 8, 8), generator=generator_for(3, Stream.LATENT, step))
        assert labels is None
        assert torch.equal(x0, ds.x[idx] + ds.std[idx] * z)
        seen.append(x0[torch.argsort(idx)])  # by item
    assert not torch.equal(seen[0], seen[1])  # the same items, other draws
    # a process's rows of the global batch are the rows of one process's batch
    halves = torch.cat([batches.take(5, (0, 3))[0], batches.take(5, (3, 8))[0]])
    assert torch.equal(halves, batches.take(5, (0, 8))[0])


def test_point_items_are_taken_as_they_are(tmp_path):
    ds = load_dataset("digits", limit=10)
    batches = Batches(ds, seed=0, batch=4, conditional=True, device=torch.device("cpu"))
    x0, labels = batches.take(2, (0, 4))
    idx = batches.order.indices(8, 4)
    assert torch.equal(x0, ds.x[idx]) and torch.equal(labels, ds.labels[idx])


@pytest.mark.slow
def test_std_zero_trains_bitwise_as_the_means_as_points(tmp_path):
    """s = 0 gives x0 = m exactly: the run is the point-data run on the means, bit for bit."""
    gauss = _latents(tmp_path, std_scale=0.0)
    points = Dataset("means", gauss.x.clone(), None, "0" * 64, False)
    train(_tiny(3), gauss, tmp_path / "g", progress=False)
    train(_tiny(3), points, tmp_path / "p", progress=False)
    a, b = _ckpt(tmp_path / "g"), _ckpt(tmp_path / "p")
    for key in ("model", "ema", "optimizer", "rng"):
        assert _states_equal(a[key], b[key]), key
    # not vacuous: with s > 0 the draws change the weights
    train(_tiny(3), _latents(tmp_path, name="s"), tmp_path / "s", progress=False)
    assert not _states_equal(a["model"], _ckpt(tmp_path / "s")["model"])


@pytest.mark.slow
def test_resume_on_gaussian_items_is_bitwise_the_uninterrupted_run(tmp_path):
    ds = _latents(tmp_path, n=10)  # 4 steps of 8 cross epoch boundaries of the 10 items
    full, half = tmp_path / "full", tmp_path / "half"
    train(_tiny(4, checkpoint_every=2), ds, full, progress=False)
    train(_tiny(2, checkpoint_every=2), ds, half, progress=False)
    train(_tiny(4, checkpoint_every=2), ds, half, resume=True, progress=False)
    a, b = _ckpt(full), _ckpt(half)
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema", "optimizer", "rng"):
        assert _states_equal(a[key], b[key]), key
    losses = [(d / "stats.jsonl").read_text().splitlines() for d in (full, half)]
    assert [len(v) for v in losses] == [2, 2]  # a record at each checkpoint
    assert [_loss(r) for r in losses[0]] == [_loss(r) for r in losses[1]]


def test_the_small_preset_takes_4x8x8_latents_with_two_levels():
    config = backbone_config((4, 8, 8), "small")
    assert config["unet"]["block_out_channels"] == [32, 64]  # lowest level 4×4
    assert config["padding"] == [0, 0, 0, 0]
    net = UNetBackbone(config)
    x = torch.randn(2, 4, 8, 8)
    out = net(x, torch.zeros(2))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_the_run_records_the_latent_transform_it_read_the_data_through(tmp_path):
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((4, 4, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "l.npz", mean=mean, std=np.full_like(mean, 0.1))
    ds = load_dataset(str(tmp_path / "l.npz"), encoder="sd-vae")
    record = ds.describe()["latent_transform"]
    scale = np.float32(0.5) / np.array([4.17, 4.62, 3.71, 3.28], np.float32)
    assert record["scale"] == scale.tolist()
    assert (
        record["bias"]
        == (np.float32(0) - np.array([5.81, 3.25, 0.12, -2.15], np.float32) * scale).tolist()
    )
    assert "latent_transform" not in load_dataset(str(tmp_path / "l.npz")).describe()


def test_the_gap_monitor_on_gaussian_items_draws_the_estimates_x0(tmp_path):
    """The monitor's fixed draws of Gaussian items are the estimate's x0 = m + s z and ε (M = n,
    the same seed): the optimal denoiser's J_θ there is the estimate's direct form (up to the
    model's float32 input, ~1e-7 relative per element), and its gap J_θ − J* the estimate's
    direct − combined; the means-as-points denoiser, blind to the within-item variance, has a
    gap far above the standard error at σ below the stds."""
    ds = _latents(tmp_path, n=12, std_scale=0.3)
    sigmas = [0.02, 0.5, 2.0]
    curve = estimate_curve(ds, sigmas, outer=256, seed=5, precision="float64", progress=False)
    monitor = GapMonitor(curve, ds, sigmas, n=256, seed=5)
    record: dict = {}
    monitor(1, OptimalDenoiser(ds, precision="float64"), record)
    for p in curve.points:
        gap = record["gap"][f"{p.sigma:g}"]
        assert gap + p.optimal_loss == pytest.approx(p.direct, rel=1e-5)
        assert abs(gap) <= 2 * p.stderr
    means = Dataset("means", ds.x.clone(), None, "0" * 64, False)
    monitor(2, OptimalDenoiser(means, precision="float64"), record)
    assert record["gap"]["0.02"] > 10 * curve.points[0].stderr


def test_cli_train_monitors_the_gap_on_gaussian_items(tmp_path, capsys):
    _latents(tmp_path, n=8)
    data, curve = str(tmp_path / "g.npz"), str(tmp_path / "curve.json")
    argv = ["estimate", "--data", data, "--sigmas", "0.2,1,5", "--outer", "16", "--quiet",
            "--out", curve]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    argv = ["train", "--data", data, "--monitor", curve, "--monitor-n", "16", "--monitor-every",
            "1", "--steps", "2", "--model", "tiny", "--batch", "4", "--warmup", "1",
            "--log-every", "1", "--no-progress", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    logged = [json.loads(r) for r in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    gaps = [r["gap"] for r in logged if "gap" in r]
    assert gaps and all(set(g) == {"0.2", "1", "5"} for g in gaps)
    assert all(math.isfinite(v) for g in gaps for v in g.values())


@pytest.mark.slow
def test_scaling_collect_on_gaussian_items_is_diagnose_of_their_mixture(
    tmp_path, capsys, monkeypatch
):
    """scaling collect needs only diagnose's J_θ and J*: on Gaussian items its rows are
    diagnose's on the same draws (x0 = m + s z, J* of the mixture)."""
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))  # J* cache files: here
    from lossfloor.diagnosis import diagnose
    from lossfloor.models import load_run
    from lossfloor.scaling import read_runs

    ds = _latents(tmp_path, n=8)
    run = tmp_path / "run"
    train(_tiny(2, checkpoint_every=2, snapshot_every=2), ds, run, progress=False)
    out = tmp_path / "runs.csv"
    argv = ["scaling", "collect", str(run), "--data", str(tmp_path / "g.npz"), "--sigmas",
            "0.1,1", "--outer", "32", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = {r.sigma: r for r in read_runs(out)}
    model, _ = load_run(run / "checkpoint-00000002.pt")
    ref = diagnose(model, ds, [0.1, 1.0], outer=32, progress=False)
    assert ref.dataset["gaussian_items"] is True
    for p in ref.points:
        assert rows[p.sigma].loss == p.model_loss
        assert float(rows[p.sigma].extra["optimal_loss"]) == p.optimal_loss

"""Trainer, backbone, EMA, checkpoints and the ``train`` CLI (tiny models on 8×8 digits)."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import lossfloor.cli
import lossfloor.cli.train
from lossfloor.backbone import UNetBackbone, backbone_config
from lossfloor.data import load_dataset
from lossfloor.errors import Interrupted, ParameterError, UserError
from lossfloor.models import check_compatible, load_run
from lossfloor.scaling import read_runs
from lossfloor.training import (
    SIGMA_BIN_EDGES,
    DenoisingLoss,
    Losses,
    StatsRecord,
    TrainConfig,
    Trainer,
    UncertaintyLoss,
    read_stats,
    train,
)
from lossfloor.training.ema import EMA
from lossfloor.training.stats import StatsAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setattr(lossfloor.cli, "SUBCOMMANDS", ["train"])
    return lossfloor.cli.main


def _digits(limit: int = 24):
    return load_dataset("digits", limit=limit)


def _tiny(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, **{"batch": 8, "model": "tiny", "warmup": 2, **kw})


def _states_equal(a, b) -> bool:
    """Bitwise equality of nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _ckpt(run_dir):
    return torch.load(run_dir / "checkpoint-latest.pt", weights_only=True)


# ----- backbone ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "levels"),
    [((1, 8, 8), 2), ((1, 28, 28), 3), ((3, 32, 32), 3), ((2, 30, 17), 3), ((3, 7, 9), 1)],
)
def test_backbone_maps_any_image_size_to_the_same_shape(shape, levels):
    net = UNetBackbone(backbone_config(shape, "tiny"))
    assert len(net.config["unet"]["block_out_channels"]) == levels
    x = torch.randn(3, *shape)
    out = net(x, torch.tensor([-1.0, 0.0, 2.0]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_backbone_pads_to_the_levels_multiple_and_crops_back():
    config = backbone_config((2, 30, 17), "tiny")
    assert config["padding"] == [1, 1, 1, 2]  # 30 → 32, 17 → 20: multiples of 2^(3−1)
    assert config["unet"]["sample_size"] == [32, 20]


def test_preset_sizes_at_28x28_are_small_enough_for_cpu():
    counts = {
        p: sum(q.numel() for q in UNetBackbone(backbone_config((1, 28, 28), p)).parameters())
        for p in ("tiny", "small")
    }
    assert 0.2e6 < counts["tiny"] < 0.4e6
    assert 0.9e6 < counts["small"] < 1.3e6


def test_conditional_backbone_uses_labels_and_requires_them():
    net = UNetBackbone(backbone_config((1, 8, 8), "tiny", num_classes=10))
    torch.nn.init.normal_(net.unet.class_embedding.weight)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    a = net(x, c, torch.tensor([0, 0]))
    b = net(x, c, torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    with pytest.raises(UserError, match="class-conditional"):
        net(x, c)


def test_backbone_rejects_images_of_another_shape():
    with pytest.raises(UserError, match="expects 1×8×8"):
        net = UNetBackbone(backbone_config((1, 8, 8), "tiny"))
        net(torch.randn(2, 1, 9, 8), torch.zeros(2))


# ----- EMA --------------------------------------------------------------------------------
def test_ema_halves_the_distance_after_one_halflife():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, halflife_images=100, rampup_ratio=None)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, images_seen=100, batch_size=100)  # β = 0.5^(100/100)
    for e, s, p in zip(ema.model.parameters(), start, model.parameters(), strict=True):
        torch.testing.assert_close(e, (s + p) / 2, rtol=0, atol=1e-6)


def test_ema_rampup_limits_the_halflife_early_on():
    ema = EMA(torch.nn.Linear(1, 1), halflife_images=10_000, rampup_ratio=0.05)
    assert ema.beta(images_seen=1000, batch_size=50) == pytest.approx(0.5 ** (50 / 50))
    assert ema.beta(images_seen=10**6, batch_size=50) == pytest.approx(0.5 ** (50 / 10_000))


# ----- trainer ----------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_gives_bitwise_identical_weights_ema_optimizer_and_rng(tmp_path):
    data = _digits(20)  # 6 steps of 8 images cross epoch boundaries of the 20 items
    full, half = tmp_path / "full", tmp_path / "half"
    train(_tiny(6, checkpoint_every=3), data, full, progress=False)
    train(_tiny(3, checkpoint_every=3), data, half, progress=False)
    train(_tiny(6, checkpoint_every=3), data, half, resume=True, progress=False)
    a, b = _ckpt(full), _ckpt(half)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer", "rng"):
        assert _states_equal(a[key], b[key]), key
    losses = [
        [json.loads(line)["loss"] for line in (d / "stats.jsonl").read_text().splitlines()]
        for d in (full, half)
    ]
    assert losses[0] == losses[1]
    # the comparison is not vacuous: another seed trains to other weights
    other = tmp_path / "other"
    train(_tiny(6, checkpoint_every=3, seed=1), data, other, progress=False)
    assert not _states_equal(a["model"], _ckpt(other)["model"])


@pytest.mark.slow
def test_train_cli_writes_run_files_and_the_loss_decreases(tmp_path, cli):
    run_dir = tmp_path / "run"
    argv = ["train", "--data", "digits", "--limit", "64", "--run-dir", str(run_dir)]
    opts = ["--steps", "100", "--batch", "16", "--model", "tiny", "--lr", "2e-3"]
    opts += ["--warmup", "10", "--log-every", "20", "--checkpoint-every", "50"]
    opts += ["--snapshot-every", "50", "--no-progress"]
    assert cli(argv + opts) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"] == _digits(64).describe()
    assert config["process"]["name"] == "edm" and config["target"]["name"] == "F"
    assert config["schedule"]["name"] == "edm"
    assert config["train"]["steps"] == 100 and config["train"]["batch"] == 16
    assert config["model"]["image_shape"] == [1, 8, 8]
    assert config["optimizer"]["name"] == "AdamW"
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 50, 60, 80, 100]
    assert [r["images"] for r in records] == [16 * r["step"] for r in records]
    for r in records:
        assert len(r["bin_loss_x0"]) == len(SIGMA_BIN_EDGES) - 1
        assert r["images_per_s"] > 0 and r["lr"] == pytest.approx(2e-3)
    assert sum(records[0]["bin_count"]) == 20 * 16
    assert records[-1]["loss"] < 0.75 * records[0]["loss"]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pt")) == [
        "checkpoint-00000050.pt",
        "checkpoint-00000100.pt",
        "checkpoint-latest.pt",
    ]
    assert _ckpt(run_dir)["step"] == 100


def test_each_sigma_lands_in_its_bin_and_each_bin_averages_its_own_losses():
    edges = SIGMA_BIN_EDGES
    nbins = len(edges) - 1
    mids = [math.sqrt(edges[k] * edges[k + 1]) for k in range(nbins)]
    # bin k: k+1 images at its geometric midpoint, each with x0 loss k; the open ends also take
    # σ below 0.002 and above 80, and an inner edge belongs to the bin below it
    sigma = [m for k, m in enumerate(mids) for _ in range(k + 1)] + [1e-4, 1e3, edges[4]]
    loss_x0 = [float(k) for k in range(nbins) for _ in range(k + 1)] + [0.0, 7.0, 3.0]
    acc = StatsAccumulator(torch.device("cpu"))
    acc.add(torch.tensor(2.0), torch.tensor(sigma, dtype=torch.float64), torch.tensor(loss_x0), 1.0)
    record = acc.record(1, len(sigma), 1e-3, 1.0)
    expected = [k + 1 for k in range(nbins)]
    expected[0], expected[3], expected[-1] = expected[0] + 1, expected[3] + 1, expected[-1] + 1
    assert record.bin_count == expected
    assert record.bin_loss_x0 == [float(k) for k in range(nbins)]
    assert record.loss == 2.0 and record.loss_x0 == pytest.approx(np.mean(loss_x0), rel=1e-12)
    empty = StatsAccumulator(torch.device("cpu"))
    empty.add(torch.tensor(1.0), torch.tensor([mids[2]], dtype=torch.float64), torch.ones(1), 1.0)
    assert empty.record(1, 1, 1e-3, 1.0).bin_loss_x0 == [None, None, 1.0] + [None] * (nbins - 3)


class RecordingLoss(DenoisingLoss):
    """The default objective, keeping what it returned."""

    def __init__(self, schedule="edm") -> None:
        super().__init__(schedule)
        self.seen: list[Losses] = []

    def __call__(self, denoiser, x0, labels, **generators):
        out = super().__call__(denoiser, x0, labels, **generators)
        self.seen.append(out)
        return out


def test_the_record_bins_the_sigmas_the_objective_drew(tmp_path):
    objective = RecordingLoss()
    last = train(_tiny(2, batch=32, log_every=2), _digits(), tmp_path / "r", objective=objective,
                 progress=False)  # fmt: skip
    sigma = torch.cat([o.sigma for o in objective.seen]).numpy()
    loss_x0 = torch.cat([o.loss_x0.detach() for o in objective.seen]).double().numpy()
    bins = np.searchsorted(np.array(SIGMA_BIN_EDGES[1:-1]), sigma, side="left")
    counts = np.bincount(bins, minlength=len(SIGMA_BIN_EDGES) - 1)
    assert last.bin_count == counts.tolist() and sum(counts) == 64
    means = [loss_x0[bins == k].mean() if counts[k] else None for k in range(len(counts))]
    assert last.bin_loss_x0 == [None if m is None else pytest.approx(m, rel=1e-12) for m in means]
    assert last.loss_x0 == pytest.approx(loss_x0.mean(), rel=1e-12)
    batch_means = [float(o.loss.detach().double().mean()) for o in objective.seen]
    assert last.loss == pytest.approx(np.mean(batch_means), rel=1e-6)


def test_stats_written_by_lossfloor_0_1_read_and_write_back_unchanged(tmp_path):
    path = DATA / "train-stats-0.1.0.jsonl"
    lines = path.read_text().splitlines()
    records = read_stats(path)
    assert [r.step for r in records] == [json.loads(line)["step"] for line in lines]
    assert all(set(r.extra) == {"gap"} and r.callback_seconds is not None for r in records)
    assert [json.dumps(r.to_json()) for r in records] == lines  # same keys, order and values
    assert StatsRecord.from_json(records[0].to_json()) == records[0]
    cut = tmp_path / "stats.jsonl"
    cut.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # an interrupted write
    assert read_stats(cut) == records[:2]


def test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(
    tmp_path, cli, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    base = ["train", "--data", "digits", "--limit", "24", "--run-dir", str(run_dir)]
    base += ["--model", "tiny", "--batch", "8", "--checkpoint-every", "2", "--no-progress"]
    assert cli([*base, "--steps", "2"]) == 0
    before = (run_dir / "checkpoint-latest.pt").read_bytes()

    def nan_forward(self, x_in, c_noise, labels=None):
        return torch.full_like(x_in, float("nan"))

    monkeypatch.setattr(UNetBackbone, "forward", nan_forward)
    capsys.readouterr()
    assert cli([*base, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "step 3" in err and "loss is nan" in err and "checkpoint" in err
    assert (run_dir / "checkpoint-latest.pt").read_bytes() == before


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    trainer = Trainer(_tiny(4, checkpoint_every=1), _digits(), tmp_path / "r", progress=False)
    trainer.run()
    good = (tmp_path / "r" / "checkpoint-latest.pt").read_bytes()
    step = trainer.optimizer.step

    def blow_up():
        step()
        with torch.no_grad():
            trainer.params[0].fill_(float("inf"))

    trainer.optimizer.step = blow_up
    trainer.config.steps = 5
    with pytest.raises(UserError, match="step 5: the model weights became non-finite"):
        trainer.run()
    assert (tmp_path / "r" / "checkpoint-latest.pt").read_bytes() == good


def test_bad_options_are_errors_of_the_parameter_and_of_its_cli_option(tmp_path, cli, capsys):
    with pytest.raises(ParameterError, match=r"^lr = 1e\+30: must be in \(0, 1\]") as info:
        _tiny(1, lr=1e30)
    assert info.value.param == "lr"
    with pytest.raises(ParameterError, match="^ema_rampup = 0"):
        _tiny(1, ema_rampup=0)
    argv = ["train", "--data", "digits", "--run-dir", str(tmp_path / "r"), "--steps", "1"]
    assert cli([*argv, "--grad-clip", "-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "lossfloor: error: --grad-clip -1.0: must be >= 0 (0 turns clipping off)"
    )


@pytest.mark.slow
def test_resume_with_data_of_another_shape_is_a_user_error(tmp_path, cli, capsys):
    run_dir = tmp_path / "run"
    train(_tiny(1), _digits(), run_dir, progress=False)
    other = tmp_path / "small.npz"
    np.savez(other, x=np.zeros((5, 1, 4, 4), dtype=np.uint8))
    argv = ["train", "--data", str(other), "--run-dir", str(run_dir), "--steps", "2", "--resume"]
    assert cli(argv) == 2
    assert "trained on 1×8×8 images" in capsys.readouterr().err
    _, config = load_run(run_dir)
    with pytest.raises(UserError, match="1×4×4"):
        check_compatible(config, load_dataset(str(other)))


def test_resume_with_other_data_of_the_same_shape_is_a_user_error(tmp_path):
    train(_tiny(1), _digits(24), tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="not the data"):
        train(_tiny(2), _digits(30), tmp_path / "r", resume=True, progress=False)


def test_resume_of_a_missing_run_dir_is_a_user_error(tmp_path, cli, capsys):
    argv = ["train", "--data", "digits", "--run-dir", str(tmp_path / "nope"), "--steps", "2"]
    assert cli([*argv, "--resume"]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_resume_with_a_changed_option_is_a_user_error(tmp_path):
    train(_tiny(1), _digits(), tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="lr"):
        train(_tiny(2, lr=5e-3), _digits(), tmp_path / "r", resume=True, progress=False)


def test_a_new_run_does_not_overwrite_an_existing_one(tmp_path):
    train(_tiny(1), _digits(), tmp_path / "r", progress=False)
    with pytest.raises(UserError, match="already holds a run; resume it"):
        train(_tiny(1), _digits(), tmp_path / "r", progress=False)


def test_callbacks_get_the_ema_denoiser_and_may_add_stats(tmp_path):
    calls = []

    def monitor(step, denoiser, record):
        x = torch.zeros(2, 1, 8, 8)
        assert denoiser(x, torch.full((2,), 1.0)).shape == x.shape
        assert not any(p.requires_grad for p in denoiser.parameters())
        calls.append(step)
        record["monitor"] = step * 10

    run_dir = tmp_path / "r"
    train(_tiny(4), _digits(), run_dir, callbacks=[monitor], callback_every=2, progress=False)
    assert calls == [2, 4]
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r.get("monitor") for r in records if r["step"] in (2, 4)] == [20, 40]


def test_load_run_gives_the_ema_or_raw_denoiser_of_the_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    train(_tiny(3, conditional=True), _digits(), run_dir, progress=False)
    ckpt = _ckpt(run_dir)
    for ema, key in ((True, "ema"), (False, "model")):
        denoiser, config = load_run(run_dir / "checkpoint-latest.pt", ema=ema)
        assert _states_equal(denoiser.net.state_dict(), ckpt[key])
        assert config["train"]["conditional"] and config["model"]["num_classes"] == 10
        x = torch.randn(4, 1, 8, 8)
        out = denoiser(x, torch.full((4,), 0.5), torch.tensor([0, 1, 2, 3]))
        assert out.shape == x.shape and torch.isfinite(out).all()
    assert not _states_equal(ckpt["ema"], ckpt["model"])


def test_conditional_training_needs_labels(tmp_path):
    data = _digits()
    unlabelled = type(data)(data.name, data.x, None, data.sha256, data.xflip)
    with pytest.raises(UserError, match="labels"):
        Trainer(_tiny(1, conditional=True), unlabelled, tmp_path / "r", progress=False)


# ----- objectives, consistency, configs ---------------------------------------------------
class _RunningMeanLoss(DenoisingLoss):
    """Divides each batch's loss by a running mean of past x0 losses: state every step changes."""

    def __init__(self) -> None:
        super().__init__("edm")
        self.mean = torch.ones((), dtype=torch.float64)

    def __call__(self, denoiser, x0, labels, **generators):
        out = super().__call__(denoiser, x0, labels, **generators)
        scale = self.mean.to(out.loss.dtype)
        self.mean = 0.5 * self.mean + 0.5 * out.loss_x0.detach().double().mean()
        return Losses(out.loss / scale, out.loss_x0, out.sigma)

    def state_dict(self):
        return {"mean": self.mean.clone()}

    def load_state_dict(self, state):
        self.mean = state["mean"].clone()


@pytest.mark.slow
def test_an_objective_with_state_is_checkpointed_and_resumes_bitwise(tmp_path):
    data = _digits(20)
    full, half, forgot = tmp_path / "full", tmp_path / "half", tmp_path / "forgot"
    objective = _RunningMeanLoss()
    train(_tiny(6, checkpoint_every=3), data, full, objective=objective, progress=False)
    for run_dir in (half, forgot):
        train(_tiny(3), data, run_dir, objective=_RunningMeanLoss(), progress=False)
    assert float(_ckpt(half)["objective"]["mean"]) != 1.0
    train(_tiny(6), data, half, resume=True, objective=_RunningMeanLoss(), progress=False)
    a, b = _ckpt(full), _ckpt(half)
    for key in ("model", "ema", "optimizer", "rng", "objective"):
        assert _states_equal(a[key], b[key]), key
    assert torch.equal(a["objective"]["mean"], objective.mean)

    # the state matters: resumed without it, the run trains to other weights
    class Forgetful(_RunningMeanLoss):
        def load_state_dict(self, state):
            pass

    train(_tiny(6), data, forgot, resume=True, objective=Forgetful(), progress=False)
    assert not _states_equal(a["model"], _ckpt(forgot)["model"])
    # and an objective without state refuses a checkpoint that has some
    with pytest.raises(UserError, match="DenoisingLoss has no state"):
        train(_tiny(7), data, half, resume=True, progress=False)


@pytest.mark.slow
def test_a_checkpoint_without_objective_state_resumes_like_before(tmp_path):
    """Checkpoints of lossfloor 0.1 hold no objective state; the default objective has none."""
    data = _digits(20)
    train(_tiny(4), data, tmp_path / "full", progress=False)
    train(_tiny(2), data, tmp_path / "old", progress=False)
    ckpt = _ckpt(tmp_path / "old")
    del ckpt["objective"]
    torch.save(ckpt, tmp_path / "old" / "checkpoint-latest.pt")
    train(_tiny(4), data, tmp_path / "old", resume=True, progress=False)
    assert _states_equal(_ckpt(tmp_path / "full")["model"], _ckpt(tmp_path / "old")["model"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"process": {"name": "vp-linear", "beta_max": 10.0}, "target": "eps",
             "schedule": "vp"},
            "schedule vp draws t of",
        ),
        ({"schedule": {"name": "edm", "sigma_data": 0.3}}, "schedule edm has sigma_data=0.3"),
        ({"target": {"name": "F", "sigma_data": 0.3}}, "sigma_data"),
    ],
)  # fmt: skip
def test_inconsistent_process_target_and_schedule_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=message) as info:
        Trainer(_tiny(1, **options), _digits(), tmp_path / "r", progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_schedule_parameters_are_recorded_and_a_run_reloads_them(tmp_path, cli):
    vp = {"beta_min": 0.2, "beta_d": 10.0}
    config = _tiny(2, process={"name": "vp-edm", **vp}, target="eps",
                   schedule={"name": "vp", **vp})  # fmt: skip
    run_dir = tmp_path / "r"
    train(config, _digits(), run_dir, progress=False)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["process"] == {"name": "vp-edm", "beta_d": 10.0, "beta_min": 0.2}
    assert saved["schedule"] == {"name": "vp", "beta_min": 0.2, "beta_d": 10.0, "eps_t": 1e-5}
    denoiser, _ = load_run(run_dir)
    assert denoiser.process.to_config() == saved["process"]
    # the CLI resumes from the recorded configs; the API refuses other schedule parameters
    argv = ["train", "--data", "digits", "--limit", "24", "--run-dir", str(run_dir)]
    assert cli([*argv, "--steps", "3", "--resume", "--no-progress"]) == 0
    assert _ckpt(run_dir)["step"] == 3
    other = {"name": "vp", **vp, "eps_t": 1e-3}
    with pytest.raises(UserError, match="trained with schedule="):
        train(_tiny(4, process=saved["process"], target="eps", schedule=other), _digits(),
              run_dir, resume=True, progress=False)  # fmt: skip


def test_the_edm_schedule_takes_the_configs_sigma_data(tmp_path):
    trainer = Trainer(_tiny(1, sigma_data=0.3), _digits(), tmp_path / "r", progress=False)
    assert trainer.objective.schedule.sigma_data == 0.3 == trainer.denoiser.target.sigma_data


def test_an_objective_must_be_the_schedule_the_config_names(tmp_path):
    with pytest.raises(UserError, match="the objective's schedule is 'fm'"):
        Trainer(_tiny(1), _digits(), tmp_path / "r", objective=DenoisingLoss("fm"))


def test_the_train_cli_module_imports_no_heavy_library_at_top_level():
    tree = ast.parse(Path(lossfloor.cli.train.__file__).read_text())
    top = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not {m.split(".")[0] for m in top} & {"torch", "numpy", "scipy", "diffusers"}


def test_resume_with_fewer_steps_than_done_is_refused_and_config_kept(tmp_path, cli, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--data", "digits", "--limit", "24", "--run-dir", str(run_dir)]
    small = ["--model", "tiny", "--batch", "8", "--no-progress"]
    assert cli([*argv, *small, "--steps", "3"]) == 0
    config = (run_dir / "config.json").read_text()
    capsys.readouterr()
    assert cli([*argv, "--steps", "2", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lossfloor: error: --steps 2: ") and "already at step 3" in err
    assert (run_dir / "config.json").read_text() == config and _ckpt(run_dir)["step"] == 3


def _interrupt_at(step: int, signum: int = signal.SIGINT):
    """A callback that sends ``signum`` to this process at ``step``."""

    def callback(at: int, denoiser, record) -> None:
        if at == step:
            os.kill(os.getpid(), signum)

    return callback


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_is_bitwise_the_same(tmp_path, signum):
    data = _digits(20)
    full, cut = tmp_path / "full", tmp_path / "cut"
    before = signal.getsignal(signum)  # SIG_IGN where the test runs in a background job
    train(_tiny(6, checkpoint_every=100), data, full, progress=False)
    with pytest.raises(Interrupted, match="saved a checkpoint at step 4"):
        train(_tiny(6, checkpoint_every=100), data, cut, progress=False,
              callbacks=[_interrupt_at(4, signum)], callback_every=1)  # fmt: skip
    assert _ckpt(cut)["step"] == 4  # no regular checkpoint had been written before step 6
    train(_tiny(6, checkpoint_every=100), data, cut, resume=True, progress=False)
    a, b = _ckpt(full), _ckpt(cut)
    for key in ("model", "ema", "optimizer", "rng"):
        assert _states_equal(a[key], b[key]), key
    assert signal.getsignal(signum) == before  # the handlers are restored


def test_an_interrupt_through_the_cli_says_what_was_kept(tmp_path, cli, capsys, monkeypatch):
    from lossfloor.training import loop

    step = loop.Trainer._train_step

    def ctrl_c_during_the_first_step(self, acc):
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still completes
        step(self, acc)

    monkeypatch.setattr(loop.Trainer, "_train_step", ctrl_c_during_the_first_step)
    argv = ["train", "--data", "digits", "--limit", "24", "--model", "tiny", "--no-progress"]
    assert cli([*argv, "--run-dir", str(tmp_path / "r"), "--steps", "3"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("lossfloor: interrupted: saved a checkpoint at step 1 in ")
    assert _ckpt(tmp_path / "r")["step"] == 1

    def ctrl_c_while_building(self):
        raise KeyboardInterrupt  # before the training loop: nothing can be saved

    monkeypatch.setattr(loop.Trainer, "_build_model", ctrl_c_while_building)
    assert cli([*argv, "--run-dir", str(tmp_path / "s"), "--steps", "3"]) == 130
    err = capsys.readouterr().err
    assert "resume" not in err and not (tmp_path / "s" / "checkpoint-latest.pt").exists()


def _interrupt_during_step(monkeypatch, step: int) -> None:
    """Send SIGINT to this process during optimiser step ``step`` (1-based), as a Ctrl-C that
    arrives mid-step (the step still completes)."""
    from lossfloor.training import loop

    original = loop.Trainer._train_step

    def patched(self, acc):
        if self.step == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, acc)

    monkeypatch.setattr(loop.Trainer, "_train_step", patched)


def _records_without_timings(run_dir) -> list[dict]:
    timing = ("seconds", "step_seconds", "images_per_s")
    return [
        {k: v for k, v in r.to_json().items() if k not in timing}
        for r in read_stats(run_dir / "stats.jsonl")
    ]


@pytest.mark.slow
def test_a_run_interrupted_inside_a_log_interval_resumes_to_the_same_stats(tmp_path, monkeypatch):
    """Interrupted at step 6 of a log interval 5–8, the resumed run's records (step 8's mean
    over steps 5–8 included) are bitwise the uninterrupted run's; timings aside."""
    data = _digits(20)
    config = _tiny(12, log_every=4, checkpoint_every=100)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(config, data, full, progress=False)
    with monkeypatch.context() as m:
        _interrupt_during_step(m, 6)
        with pytest.raises(Interrupted, match="saved a checkpoint at step 6"):
            train(config, data, cut, progress=False)
    assert [r["step"] for r in _records_without_timings(cut)] == [4]
    forgot = tmp_path / "forgot"
    shutil.copytree(cut, forgot)
    train(config, data, cut, resume=True, progress=False)
    expected = _records_without_timings(full)
    assert [r["step"] for r in expected] == [4, 8, 12]
    assert _records_without_timings(cut) == expected
    # not vacuous: resumed from a checkpoint without the interval's sums (an older one),
    # step 8's record is the mean over steps 7–8 alone
    ckpt = _ckpt(forgot)
    del ckpt["stats"]
    torch.save(ckpt, forgot / "checkpoint-latest.pt")
    train(config, data, forgot, resume=True, progress=False)
    other = _records_without_timings(forgot)
    assert other[1]["step"] == 8 and sum(other[1]["bin_count"]) == 2 * 8
    assert other[1]["loss"] != expected[1]["loss"]
    assert other[0] == expected[0] and other[2] == expected[2]


@pytest.mark.slow
def test_train_cli_keeps_a_snapshot_every_k_steps_whatever_checkpoint_every_is(
    tmp_path, cli, monkeypatch, capsys
):
    """--snapshot-every 2 with the default --checkpoint-every (500) keeps steps 2, 4 and 6,
    each the weights of that step, and scaling collect measures each of them."""
    monkeypatch.setenv("LOSSFLOOR_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    argv = ["train", "--data", "digits", "--limit", "24", "--run-dir", str(run_dir),
            "--model", "tiny", "--batch", "8", "--warmup", "2", "--no-progress"]  # fmt: skip
    assert cli([*argv, "--steps", "6", "--snapshot-every", "2"]) == 0
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pt")) == [
        "checkpoint-00000002.pt",
        "checkpoint-00000004.pt",
        "checkpoint-00000006.pt",
        "checkpoint-latest.pt",
    ]
    snapshots = {
        step: torch.load(run_dir / f"checkpoint-{step:08d}.pt", weights_only=True)
        for step in (2, 4, 6)
    }
    assert [s["step"] for s in snapshots.values()] == [2, 4, 6]
    # the snapshot of step 2 is the state a run of 2 steps ends with
    two = tmp_path / "two"
    assert cli([*argv[:-1], "--run-dir", str(two), "--steps", "2", "--no-progress"]) == 0
    for key in ("model", "ema", "optimizer", "rng"):
        assert _states_equal(snapshots[2][key], _ckpt(two)[key]), key
    assert not _states_equal(snapshots[2]["model"], snapshots[4]["model"])
    # snapshots are no log points: records every --log-every steps and at the end
    assert [r.step for r in read_stats(run_dir / "stats.jsonl")] == [6]
    out = tmp_path / "runs.csv"
    collect = ["scaling", "collect", str(run_dir), "--data", "digits", "--limit", "24",
               "--sigmas", "0.5,2", "--outer", "16", "--out", str(out), "--quiet"]  # fmt: skip
    monkeypatch.setattr(lossfloor.cli, "SUBCOMMANDS", ["train", "scaling"])
    assert lossfloor.cli.main(collect) == 0, capsys.readouterr().err
    rows = read_runs(out)
    assert sorted(int(r.extra["step"]) for r in rows) == [2] * 3 + [4] * 3 + [6] * 3


# ----- EDM2's learned uncertainty weighting -----------------------------------------------
def _identity(x, sigma, labels):
    """A 'denoiser' that returns its input: the x0 loss is σ²·mean(ε²), E = σ² exactly."""
    return x


def test_uncertainty_loss_starts_as_the_plain_loss_and_reweights_by_its_formula():
    x0 = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    plain, learned = DenoisingLoss("edm"), UncertaintyLoss("edm", seed=0)

    def draws():
        return {"g_sigma": torch.Generator().manual_seed(1), "g_noise": torch.Generator()}

    a = plain(_identity, x0, None, **draws())
    b = learned(_identity, x0, None, **draws())
    assert torch.equal(a.sigma, b.sigma) and torch.equal(a.loss_x0, b.loss_x0)
    assert torch.equal(a.loss, b.loss)  # u ≡ 0 at the start: e^0·w·L + 0
    with torch.no_grad():
        learned.logvar.linear.bias.fill_(0.7)
        learned.logvar.linear.weight.normal_(generator=torch.Generator().manual_seed(2))
    c = learned(_identity, x0, None, **draws())
    # u by hand: √2·cos(2π(f·ln σ/4 + φ)) features, then the linear map
    net = learned.logvar
    feats = 2**0.5 * torch.cos(2 * math.pi * (a.sigma.log()[:, None] / 4 * net.freqs.double()
                                              + net.phases.double()))  # fmt: skip
    u = (feats @ net.linear.weight.double().T).squeeze(1) + float(net.linear.bias.detach())
    assert u.std() > 0.5  # σ-dependent
    torch.testing.assert_close(c.loss.double(), a.loss.double() * torch.exp(-u) + u,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_uncertainty_learns_the_log_of_the_weighted_loss_per_sigma():
    """min_u e^{−u}·E[w·L] + u is at u = ln E[w·L]. With D(x) = x, E[L] = σ² and EDM's
    λ = (σ² + σ_d²)/(σ·σ_d)², so the optimum is u*(σ) = ln(1 + σ²/σ_d²)."""
    objective = UncertaintyLoss("edm", seed=0)
    opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
    draws = {"g_sigma": torch.Generator().manual_seed(0), "g_noise": torch.Generator()}
    x0 = torch.zeros(256, 1, 8, 8)
    for _ in range(1500):
        loss = objective(_identity, x0, None, **draws).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    sigma = torch.tensor([0.05, 0.1, 0.3, 1.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        u = objective.logvar(sigma).double()
    optimum = torch.log1p(sigma**2 / 0.5**2)  # 0.01 … 2.83
    assert (u - optimum).abs().max() < 0.05, (u, optimum)  # u started at 0, the optimum at 2.83


@pytest.mark.slow
def test_uncertainty_run_resumes_bitwise_with_u_in_checkpoint_and_optimizer(tmp_path):
    data = _digits(20)
    full, half = tmp_path / "full", tmp_path / "half"
    config = {"uncertainty": True, "lr": 1e-2, "checkpoint_every": 3}
    train(_tiny(6, **config), data, full, progress=False)
    train(_tiny(3, **config), data, half, progress=False)
    train(_tiny(6, **config), data, half, resume=True, progress=False)
    a, b = _ckpt(full), _ckpt(half)
    for key in ("model", "ema", "optimizer", "rng", "objective"):
        assert _states_equal(a[key], b[key]), key
    u = a["objective"]["uncertainty"]
    assert float(u["linear.bias"]) != 0.0 and bool((u["linear.weight"] != 0).any())
    # u's parameters are the optimizer's last ones (after the net's)
    n_net = len(list(UNetBackbone(backbone_config((1, 8, 8), "tiny")).parameters()))
    assert len(a["optimizer"]["param_groups"][0]["params"]) == n_net + 2
    assert set(a["optimizer"]["state"]) == set(range(n_net + 2))
    # u changes the training: the plain run trains to other weights from the same draws
    plain = tmp_path / "plain"
    train(_tiny(6, lr=1e-2, checkpoint_every=3), data, plain, progress=False)
    assert not _states_equal(a["model"], _ckpt(plain)["model"])
    # and the run cannot be resumed without it, nor a plain run with it
    with pytest.raises(UserError, match="trained with uncertainty=True"):
        train(_tiny(7, lr=1e-2), data, half, resume=True, progress=False)
    with pytest.raises(UserError, match="trained with uncertainty=False"):
        train(_tiny(7, lr=1e-2, uncertainty=True), data, plain, resume=True, progress=False)
    # an objective without u refuses the checkpoint's u state
    with pytest.raises(UserError, match="uncertainty"):
        train(_tiny(7, **config), data, half, resume=True,
              objective=DenoisingLoss("edm"), progress=False)  # fmt: skip


def test_train_cli_uncertainty_flag_trains_u_and_resumes_with_it(tmp_path, cli):
    run_dir = tmp_path / "r"
    argv = ["train", "--data", "digits", "--limit", "24", "--run-dir", str(run_dir),
            "--model", "tiny", "--batch", "8", "--warmup", "1", "--no-progress"]  # fmt: skip
    assert cli([*argv, "--steps", "2", "--uncertainty"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["train"]["uncertainty"] is True
    assert cli([*argv, "--steps", "4", "--resume"]) == 0  # the flag comes from config.json
    assert float(_ckpt(run_dir)["objective"]["uncertainty"]["linear.bias"]) != 0.0

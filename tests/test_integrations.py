"""lossfloor.integrations: each adapter against the real package (TensorBoard, accelerate,
Lightning), EDM's and EDM2's losses against their published formulas, and the plain files."""

from __future__ import annotations

import csv
import json
import math
import sys
import types

import pytest
import torch
from test_tracker import power_curve

from lossfloor.errors import UserError
from lossfloor.tracker import GapTracker


def fed_tracker(**kw) -> GapTracker:
    """A tracker (EDM, target F) fed 300 samples spread over ln σ."""
    t = GapTracker(power_curve(), half_life=math.inf, bins=6, **kw)
    g = torch.Generator().manual_seed(1)
    s = torch.exp(torch.rand(300, generator=g, dtype=torch.float64) * 9 - 4)
    loss_x0 = t.optimal_loss(s) * 1.3 + 0.01 * torch.rand(300, generator=g, dtype=torch.float64)
    t.update_x0(s, loss_x0)
    return t


def read_events(folder) -> object:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_scalars_and_the_gap_image_read_back(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lossfloor.integrations.tensorboard import log_tensorboard

    tracker = fed_tracker()
    writer = SummaryWriter(str(tmp_path))
    logged = log_tensorboard(writer, tracker, step=7)
    writer.close()
    events = read_events(tmp_path)
    assert set(events.Tags()["scalars"]) == set(logged) == set(tracker.log_dict("lossfloor/"))
    for key, value in logged.items():
        (scalar,) = events.Scalars(key)
        assert scalar.step == 7
        assert scalar.value == pytest.approx(value, rel=1e-6)  # float32 in the event file
    (image,) = events.Images("lossfloor/gap_vs_sigma")
    assert image.step == 7 and image.width > 100 and image.height > 100


def test_accelerate_logs_the_tracker_through_its_own_tensorboard_tracker(tmp_path):
    from accelerate import Accelerator

    from lossfloor.integrations.accelerate import log_accelerate

    tracker = fed_tracker()
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    logged = log_accelerate(accelerator, tracker, step=3)
    accelerator.end_training()
    events = read_events(next(p for p in tmp_path.rglob("events.out.tfevents.*")).parent)
    assert set(logged) == set(tracker.log_dict("lossfloor/")) and logged
    for key, value in logged.items():
        (scalar,) = events.Scalars(key)
        assert scalar.step == 3 and scalar.value == pytest.approx(value, rel=1e-6)


@pytest.mark.slow
def test_lightning_callback_feeds_the_tracker_from_training_step_and_logs(tmp_path):
    """A LightningModule on CPU returns σ and per-sample losses; the callback's tracker equals
    one fed the same outputs, and the CSV logger holds its values at the log steps."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from lossfloor.integrations.lightning import GapCallback

    seen = []

    class Toy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            (x0,) = batch
            sigma = torch.exp(torch.randn(len(x0)) * 1.2 - 1.2)
            noisy = x0 + sigma[:, None] * torch.randn_like(x0)
            per_sample = (self.lin(noisy) - x0).square().mean(1) / (
                0.5**2 * sigma**2 / (0.25 + sigma**2)
            )
            seen.append((per_sample.detach().clone(), sigma.clone()))
            return {"loss": per_sample.mean(), "per_sample_loss": per_sample, "sigma": sigma}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    tracker = GapTracker(power_curve(), bins=4, half_life=math.inf)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", devices=1, logger=CSVLogger(str(tmp_path)),
        callbacks=[GapCallback(tracker, log_every=2)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Toy(), loader)
    reference = GapTracker(power_curve(), bins=4, half_life=math.inf)
    for loss, sigma in seen:
        reference.update(loss, sigma=sigma)
    assert len(seen) == 4 and tracker.summary() == reference.summary()
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).read_text().splitlines()))
    logged = [r for r in rows if any(k.startswith("lossfloor/gap/") and r[k] for k in r)]
    assert [int(r["step"]) for r in logged] == [2, 4]
    last = {k: float(v) for k, v in logged[-1].items() if k.startswith("lossfloor/") and v}
    assert last == pytest.approx(reference.log_dict("lossfloor/"), rel=1e-9)


def test_lightning_callback_refuses_a_training_step_without_per_sample_losses():
    pytest.importorskip("pytorch_lightning")
    from lossfloor.integrations.lightning import GapCallback

    callback = GapCallback(GapTracker(power_curve()))
    with pytest.raises(UserError, match="training_step must return a dict"):
        callback.on_train_batch_end(None, None, torch.tensor(1.0), None, 0)


# ----- EDM and EDM2: their published losses, written here from the papers' code -------------


def edm_loss(net, images, labels=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """EDM (Karras et al. 2022), EDMLoss: ln σ ~ N(P_mean, P_std²), λ = (σ² + σ_d²)/(σσ_d)²,
    loss = λ·(D(y + n, σ) − y)², n ~ N(0, σ²I)."""
    sigma = (torch.randn([images.shape[0], 1, 1, 1]) * P_std + P_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    n = torch.randn_like(images) * sigma
    return weight * ((net(images + n, sigma, labels, augment_labels=None) - images) ** 2)


def edm2_loss(net, images, labels=None, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
    """EDM2 (Karras et al. 2024), EDM2Loss: the same draws; loss = (λ/e^u)·(D − y)² + u."""
    sigma = (torch.randn([images.shape[0], 1, 1, 1]) * P_std + P_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noise = torch.randn_like(images) * sigma
    denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
    return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar


class ToyNet(torch.nn.Module):
    """D(x, σ) = x/(1 + σ²)·a + b, u(σ) = 0.1·ln σ: smooth in σ, with a learned log-variance."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.9))

    def forward(self, x, sigma, labels=None, augment_labels=None, return_logvar=False):
        out = self.a * x / (1 + sigma**2)
        return (out, 0.1 * sigma.log()) if return_logvar else out


def edm_curve():
    return power_curve()  # σ 0.01…200 covers EDM's and EDM2's draws at these seeds


@pytest.mark.parametrize(
    ("wrapper", "reference", "p_mean", "p_std"),
    [("EDMGapLoss", edm_loss, -1.2, 1.2), ("EDM2GapLoss", edm2_loss, -0.4, 1.0)],
)
def test_edm_wrappers_draw_the_same_sigma_and_noise_and_return_the_same_loss(
    wrapper, reference, p_mean, p_std, monkeypatch
):
    """Same RNG state → bitwise the same loss as the published formula; the tracker gets the
    σ drawn and λ·mean(D − y)² (x0 loss mean(D − y)² after the F factor λ)."""
    import lossfloor.integrations.edm as edm

    monkeypatch.setattr(edm, "edm_report", lambda: None)
    net, images = ToyNet(), torch.rand(8, 1, 4, 4) * 2 - 1
    loss_fn = getattr(edm, wrapper)(curve=edm_curve(), bins=5)
    torch.manual_seed(11)
    ours = loss_fn(net, images)
    torch.manual_seed(11)
    theirs = reference(net, images)
    assert torch.equal(ours, theirs)
    torch.manual_seed(11)
    sigma = (torch.randn([8, 1, 1, 1]) * p_std + p_mean).exp()
    noise = torch.randn_like(images) * sigma
    denoised = net(images + noise, sigma)
    expected = GapTracker(edm_curve(), bins=5)
    expected.update_x0(sigma.reshape(-1), (denoised - images).square().flatten(1).mean(1))
    for a, b in zip(loss_fn.tracker.summary(), expected.summary(), strict=True):
        assert a["count"] == b["count"]
        if a["gap"] is not None:  # float32 losses: λ·mse then /λ, a few float32 roundings
            assert a["gap"] == pytest.approx(b["gap"], rel=1e-5, abs=1e-7)


def test_edm_stats_jsonl_in_edms_format(tmp_path, monkeypatch):
    """Without EDM on the path: one line per write, {"Gap/sigma=…": {num, mean, std}} of the
    per-sample x0 gaps per bin, and a timestamp."""
    import lossfloor.integrations.edm as edm

    monkeypatch.setattr(edm, "edm_report", lambda: None)
    loss_fn = edm.EDMGapLoss(curve=edm_curve(), bins=4)
    torch.manual_seed(0)
    images = torch.rand(32, 1, 4, 4) * 2 - 1
    loss_fn(ToyNet(), images)
    path = tmp_path / "stats.jsonl"
    loss_fn.stats.write(path)
    (line,) = path.read_text().splitlines()
    stats = json.loads(line)
    assert "timestamp" in stats
    names = [f"Gap/sigma={math.exp(float(c)):.3g}" for c in loss_fn.tracker.centres]
    assert set(stats) - {"timestamp"} == set(names)
    assert sum(stats[n]["num"] for n in names) == 32
    rows = loss_fn.tracker.summary()
    for name, row in zip(names, rows, strict=True):
        if stats[name]["num"] == 1:
            assert stats[name]["std"] == 0.0
        if stats[name]["num"]:  # the bin mean of the gaps = the tracker's mean (one σ: exact)
            assert row["count"] == stats[name]["num"]


def test_edm_training_stats_report_is_used_where_edm_is_importable(monkeypatch):
    """With EDM's torch_utils.training_stats importable, every bin is reported on every call
    (an empty list where a bin has none), as EDM asks of report()."""
    import lossfloor.integrations.edm as edm

    reported = []
    fake = types.ModuleType("torch_utils.training_stats")
    fake.report = lambda name, value: reported.append((name, torch.as_tensor(value).numel()))
    package = types.ModuleType("torch_utils")
    package.training_stats = fake
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.training_stats", fake)
    loss_fn = edm.EDMGapLoss(curve=edm_curve(), bins=4)
    assert loss_fn.stats is None
    loss_fn(ToyNet(), torch.rand(16, 1, 4, 4))
    assert [n for n, _ in reported] == [
        f"Gap/sigma={math.exp(float(c)):.3g}" for c in loss_fn.tracker.centres
    ]
    assert sum(k for _, k in reported) == 16


def test_edm_wrappers_pickle_as_edm_snapshots_do(monkeypatch):
    """EDM's loop pickles loss_fn into every snapshot: the wrapper, its tracker and its stats
    survive a round trip with the same state."""
    import pickle

    import lossfloor.integrations.edm as edm

    monkeypatch.setattr(edm, "edm_report", lambda: None)
    loss_fn = edm.EDM2GapLoss(curve=edm_curve(), bins=4)
    loss_fn(ToyNet(), torch.rand(8, 1, 4, 4))
    copy = pickle.loads(pickle.dumps(loss_fn))
    assert copy.tracker.summary() == loss_fn.tracker.summary()
    assert copy.stats.as_dict() == loss_fn.stats.as_dict()


def test_edm_wrapper_refuses_a_tracker_in_other_units():
    from lossfloor.integrations.edm import EDMGapLoss

    with pytest.raises(UserError, match="target F"):
        EDMGapLoss(tracker=GapTracker(power_curve(), process="ve", target="x0"))


# ----- plain files ------------------------------------------------------------------------


def test_csv_and_jsonl_append_one_row_per_bin_and_step(tmp_path):
    from lossfloor.integrations.files import CSV_HEADER, append_csv, append_jsonl

    tracker = fed_tracker()
    rows = append_csv(tmp_path / "gap.csv", tracker, 10)
    append_csv(tmp_path / "gap.csv", tracker, 20)
    lines = list(csv.reader((tmp_path / "gap.csv").read_text().splitlines()))
    assert tuple(lines[0]) == CSV_HEADER and len(lines) == 1 + 2 * len(rows)
    assert [float(x) for x in lines[1][1:5]] == pytest.approx(
        [rows[0][k] for k in ("sigma", "loss", "optimal_loss", "gap")], rel=1e-12
    )
    append_jsonl(tmp_path / "gap.jsonl", tracker, 10)
    record = json.loads((tmp_path / "gap.jsonl").read_text())
    assert record == {"step": 10, "bins": rows}

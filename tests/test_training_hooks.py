"""Training hooks (``training.hooks``): what the trainer hands them per batch and per log step,
their state across a resume, and the built-in hooks (statistics, gap monitor, online gap)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_training import RecordingLoss, _states_equal
from tolerances import sum_rtol

from lossfloor.data import load_dataset
from lossfloor.distributed import Group
from lossfloor.errors import UserError
from lossfloor.optimal import Curve
from lossfloor.optimal.curve import CurvePoint
from lossfloor.schedules import OptimalLossSchedule
from lossfloor.training import (
    SIGMA_BIN_EDGES,
    DenoisingLoss,
    TrainConfig,
    read_stats,
    train,
)
from lossfloor.training.hooks import Batch, Hook, LogStep, Reducer, TrainingHook
from lossfloor.training.loss import OnlineGap
from lossfloor.training.monitor import GapMonitor
from lossfloor.training.stats import StatsAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = ("seconds", "step_seconds", "images_per_s", "callback_seconds")


def _digits(limit: int = 24):
    return load_dataset("digits", limit=limit)


def _tiny(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, **{"batch": 8, "model": "tiny", "warmup": 2, **kw})


def _ckpt(run_dir):
    return torch.load(run_dir / "checkpoint-latest.pt", weights_only=True)


def _records(run_dir) -> list[dict]:
    """stats.jsonl's records, timings aside."""
    return [
        {k: v for k, v in r.to_json().items() if k not in TIMING}
        for r in read_stats(run_dir / "stats.jsonl")
    ]


class _Recording(Hook):
    """Keeps every batch and log step; logs ``{name: step}`` every ``log_every`` steps."""

    def __init__(self, name: str = "recording", log_every: int = 0, log: bool = True) -> None:
        self.name, self.log_every, self.log = name, log_every, log
        self.batches: list[Batch] = []
        self.logs: list[LogStep] = []

    @property
    def state_key(self) -> str:
        return self.name

    def on_batch(self, batch: Batch) -> None:
        self.batches.append(batch)

    def on_log(self, log: LogStep) -> dict:
        self.logs.append(log)
        return {self.name: log.step} if self.log else {}


# ----- what a hook gets ---------------------------------------------------------------------
def test_a_hook_gets_every_batch_and_its_sigmas_and_losses_are_what_the_stats_record(tmp_path):
    hook, objective = _Recording(), RecordingLoss()
    run_dir = tmp_path / "r"
    train(_tiny(4, log_every=2), _digits(), run_dir, objective=objective, hooks=[hook],
          progress=False)  # fmt: skip
    assert [b.step for b in hook.batches] == [1, 2, 3, 4]
    for batch, out in zip(hook.batches, objective.seen, strict=True):
        assert torch.equal(batch.sigma, out.sigma) and batch.sigma.shape == (8,)
        assert torch.equal(batch.loss_x0, out.loss_x0.detach()) and not batch.loss_x0.requires_grad
        assert torch.equal(batch.loss, out.loss.detach())
        assert torch.equal(batch.batch_loss, out.loss.detach().mean())  # one process: its mean
        assert batch.seconds > 0 and batch.model.net.training
    records = read_stats(run_dir / "stats.jsonl")
    assert [r.step for r in records] == [2, 4]
    edges = np.array(SIGMA_BIN_EDGES[1:-1])
    for record, pair in zip(records, (hook.batches[:2], hook.batches[2:]), strict=True):
        sigma = torch.cat([b.sigma for b in pair]).numpy()
        loss_x0 = torch.cat([b.loss_x0 for b in pair]).double().numpy()
        bins = np.searchsorted(edges, sigma, side="left")
        counts = np.bincount(bins, minlength=len(edges) + 1)
        assert record.bin_count == counts.tolist()
        # float64 means of ≤ 16 non-negative terms, here and in the stats summed in another
        # order (index_add_): each within sum_rtol(16 + 1) of the exact mean (+1: the division)
        for k, got in enumerate(record.bin_loss_x0):
            assert (got is None) == (counts[k] == 0)
            if got is not None:
                assert got == pytest.approx(loss_x0[bins == k].mean(), rel=2 * sum_rtol(17))
        mean_batch_loss = np.mean([float(b.batch_loss) for b in pair])
        assert record.loss == pytest.approx(mean_batch_loss, rel=2 * sum_rtol(2 + 1))
        assert record.extra == {"recording": record.step}
    # each log step: the EMA denoiser (in eval mode, no gradients) and the record so far
    assert [log.step for log in hook.logs] == [2, 4]
    for log, record in zip(hook.logs, records, strict=True):
        assert not log.model.net.training
        assert not any(p.requires_grad for p in log.model.parameters())
        assert log.main and log.record["loss"] == record.loss
        assert log.record["bin_count"] == record.bin_count


def test_a_hook_with_its_own_cadence_adds_log_steps_and_the_hooks_time(tmp_path):
    """Trainer log_every = 2, a hook every 3 steps, one that logs nothing at every log step:
    records at 2, 3, 4, 6; the hooks' time (callback_seconds) where the cadence hook ran."""
    every3, quiet = _Recording("every3", log_every=3), _Recording("quiet", log=False)
    run_dir = tmp_path / "r"
    train(_tiny(6, log_every=2), _digits(), run_dir, hooks=[every3, quiet], progress=False)
    lines = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3, 4, 6]
    assert [log.step for log in every3.logs] == [3, 6]
    assert [log.step for log in quiet.logs] == [2, 3, 4, 6]
    assert [r.get("every3") for r in lines] == [None, 3, None, 6]
    assert ["callback_seconds" in r for r in lines] == [False, True, False, True]
    assert list(lines[1])[-2:] == ["every3", "callback_seconds"]  # the 0.1 layout: extra, time


# ----- state and resume ---------------------------------------------------------------------
class _DecayedBins(Hook):
    """A hook with state: per σ bin, decayed sums of the x0 losses and counts (float64), their
    ratio logged; the state changes with every batch."""

    state_key = "decayed-bins"

    def __init__(self) -> None:
        self.inner = torch.tensor(SIGMA_BIN_EDGES[1:-1], dtype=torch.float64)
        self.sums = torch.zeros(len(SIGMA_BIN_EDGES) - 1, dtype=torch.float64)
        self.counts = torch.zeros_like(self.sums)

    def on_batch(self, batch: Batch) -> None:
        k = torch.bucketize(batch.sigma, self.inner)
        self.sums = 0.9 * self.sums + torch.zeros_like(self.sums).index_add_(
            0, k, batch.loss_x0.double()
        )
        self.counts = 0.9 * self.counts + torch.zeros_like(self.counts).index_add_(
            0, k, torch.ones_like(batch.sigma)
        )

    def on_log(self, log: LogStep) -> dict:
        seen = self.counts > 0
        return {"decayed": (self.sums[seen] / self.counts[seen]).tolist()}

    def state_dict(self) -> dict:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state) -> None:
        self.sums, self.counts = state["sums"].clone(), state["counts"].clone()


def test_a_hooks_state_is_checkpointed_and_the_resumed_run_is_bitwise_the_same(tmp_path):
    data = _digits(20)
    config = {"log_every": 2, "checkpoint_every": 3}
    full, half = tmp_path / "full", tmp_path / "half"
    whole = _DecayedBins()
    train(_tiny(6, **config), data, full, hooks=[whole], progress=False)
    train(_tiny(3, **config), data, half, hooks=[_DecayedBins()], progress=False)
    forgot = tmp_path / "forgot"
    shutil.copytree(half, forgot)
    saved = _ckpt(half)["hooks"]["decayed-bins"]
    assert float(saved["counts"].sum()) > 0
    resumed = _DecayedBins()
    train(_tiny(6, **config), data, half, resume=True, hooks=[resumed], progress=False)
    assert torch.equal(resumed.sums, whole.sums) and torch.equal(resumed.counts, whole.counts)
    a, b = _ckpt(full), _ckpt(half)
    for key in ("model", "ema", "optimizer", "rng", "stats", "hooks"):
        assert _states_equal(a[key], b[key]), key
    assert _records(half) == _records(full)
    assert [r["step"] for r in _records(full)] == [2, 3, 4, 6]

    # the state matters: a hook that ignores it logs other values from the same batches
    class Forgetful(_DecayedBins):
        def load_state_dict(self, state) -> None:
            pass

    train(_tiny(6, **config), data, forgot, resume=True, hooks=[Forgetful()], progress=False)
    assert _records(forgot)[:2] == _records(full)[:2]
    assert _records(forgot)[2]["decayed"] != _records(full)[2]["decayed"]
    assert _states_equal(_ckpt(forgot)["model"], a["model"])  # the training is the same
    # a resume without the hook is refused: its state would be lost
    with pytest.raises(UserError, match=r"hooks \['decayed-bins'\]"):
        train(_tiny(7, **config), data, full, resume=True, progress=False)


def test_a_run_without_hook_state_keeps_the_checkpoint_layout(tmp_path):
    train(_tiny(2), _digits(), tmp_path / "r", hooks=[_Recording()], progress=False)
    keys = ["format", "step", "images", "seconds", "config", "model", "ema", "optimizer",
            "objective", "rng", "stats"]  # fmt: skip
    assert list(_ckpt(tmp_path / "r")) == keys


# ----- checks ---------------------------------------------------------------------------------
class _NoState:
    def on_batch(self, batch):
        pass


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ([_NoState()], "_NoState is not a training hook: it lacks state_key, log_every, on_log"),
        ([_Recording("a"), _Recording("a")], "two hooks have the state_key 'a'"),
        ([_Recording("a", log_every=-1)], "log_every = -1"),
    ],
)
def test_a_bad_hook_is_a_one_line_error_before_the_run_starts(tmp_path, hooks, message):
    with pytest.raises(UserError, match=message) as info:
        train(_tiny(1), _digits(), tmp_path / "r", hooks=hooks, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r").exists()


def test_the_built_in_hooks_and_the_group_meet_the_protocols():
    schedule = OptimalLossSchedule.from_curve(_curve(), gap="online")
    for hook in (StatsAccumulator(torch.device("cpu")), OnlineGap(schedule), Hook()):
        assert isinstance(hook, TrainingHook)
    assert isinstance(Group(), Reducer)
    assert not isinstance(object(), TrainingHook)


# ----- the statistics over processes ------------------------------------------------------------
class _TwoAlike:
    """Two processes whose rows are alike: the sum over them is twice this one's."""

    world = 2

    def __init__(self, main: bool) -> None:
        self.main = main

    def sum(self, tensor):
        return tensor.mul_(2)


def test_the_statistics_sum_their_bins_over_the_reducer_they_were_given():
    sigma = torch.tensor([0.01, 0.5, 0.6, 50.0], dtype=torch.float64)
    batch = Batch(sigma, torch.tensor([1.0, 2.0, 4.0, 8.0]), batch_loss=torch.tensor(3.0),
                  seconds=0.5)  # fmt: skip
    cpu = torch.device("cpu")
    one, two = StatsAccumulator(cpu), StatsAccumulator(cpu, _TwoAlike(main=True))
    for acc in (one, two):
        acc.on_batch(batch)
    state = two.state_dict()  # the bins of both processes; the sums of this one unchanged
    assert torch.equal(state["bin_count"], 2 * one.bin_count) and state["images"] == 8
    assert torch.equal(two.bin_count, one.bin_count)
    log = LogStep(1, None, {})
    a, b = one.on_log(log), two.on_log(log)
    assert b["bin_count"] == [2 * c for c in a["bin_count"]]
    assert b["bin_loss_x0"] == a["bin_loss_x0"] and b["loss"] == a["loss"] == 3.0
    assert b["images_per_s"] == 2 * a["images_per_s"] == 16.0
    assert two.steps == 0 and not bool(two.bin_count.any())  # a new interval
    # a resume: the main process takes every process's bins, another none of them
    other = StatsAccumulator(torch.device("cpu"), _TwoAlike(main=False))
    other.load_state_dict(state)
    assert not bool(other.bin_count.any()) and other.steps == 1
    with pytest.raises(UserError, match="batch_loss and seconds"):
        one.on_batch(Batch(sigma, batch.loss_x0))


# ----- the gap monitor and the online gap -------------------------------------------------------
def _curve(variance: float = 0.25) -> Curve:
    """J* of Gaussian data of this variance per element on EDM's σ range (any curve that covers
    the optimal schedule's range will do)."""
    sigmas = np.geomspace(0.002, 80, 17)
    points = tuple(
        CurvePoint(sigma=float(s), optimal_loss=float(variance * s**2 / (s**2 + variance)))
        for s in sigmas
    )
    return Curve(points=points, data_variance=variance)


def test_the_gap_monitor_logs_its_gap_every_log_every_steps_on_the_main_process(tmp_path):
    data = _digits()
    monitor = GapMonitor(_curve(), data, sigmas=[0.5, 2.0], n=16, log_every=2)
    assert isinstance(monitor, TrainingHook)
    zero = lambda x, s, labels=None: torch.zeros_like(x)  # noqa: E731
    as_callback: dict = {}
    monitor(1, zero, as_callback)
    assert set(as_callback["gap"]) == {"0.5", "2"}
    assert monitor.on_log(LogStep(1, zero, {})) == as_callback  # the fixed draws: paired
    assert monitor.on_log(LogStep(1, zero, {}, main=False)) == {}
    train(_tiny(4, log_every=3), data, tmp_path / "r", hooks=[monitor], progress=False)
    gaps = {r.step: r.extra.get("gap") for r in read_stats(tmp_path / "r" / "stats.jsonl")}
    assert list(gaps) == [2, 3, 4] and gaps[3] is None
    assert set(gaps[2]) == set(gaps[4]) == {"0.5", "2"} and gaps[2] != gaps[4]


def test_the_online_gap_learns_through_its_hook_from_every_batch_the_trainer_ran(tmp_path):
    """Calling the objective leaves the schedule as it is; the trainer's OnlineGap hook hands it
    each batch, so its checkpointed state is the schedule's after observing them in order."""
    schedule = OptimalLossSchedule.from_curve(_curve(), gap="online", halflife=40.0)
    objective = DenoisingLoss(schedule)
    assert [type(h) for h in objective.hooks()] == [OnlineGap]
    assert DenoisingLoss("edm").hooks() == []
    x0 = torch.zeros(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    objective(lambda x, s, labels: x, x0, None, g_sigma=g, g_noise=g)
    assert float(schedule.state_dict()["count"].sum()) == 0  # not observed by the call

    recording = _Recording()
    config = _tiny(4, schedule=schedule.to_config())
    train(config, _digits(), tmp_path / "r", hooks=[recording], progress=False)
    replay = OptimalLossSchedule.from_curve(_curve(), gap="online", halflife=40.0)
    for batch in recording.batches:
        replay.observe(batch.sigma, batch.loss_x0)
    saved = _ckpt(tmp_path / "r")["objective"]["schedule"]
    assert float(saved["count"].sum()) > 0
    assert torch.equal(saved["sum"], replay.state_dict()["sum"])
    assert torch.equal(saved["count"], replay.state_dict()["count"])

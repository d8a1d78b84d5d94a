"""GapTracker inside lossfloor's own trainer: as a hook (its log values and checkpointed state)
and as the --monitor hook's per-bin gap of the training losses (``gap_bins``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_training_hooks import _ckpt, _curve, _digits, _records, _tiny

from lossfloor.tracker import GapTracker
from lossfloor.training import train
from lossfloor.training.monitor import GapMonitor
from lossfloor.training.stats import read_stats


@pytest.mark.slow
def test_the_trainer_feeds_the_tracker_hook_and_the_monitor_the_same_batches(tmp_path):
    """One run with both hooks: the monitor's logged gap_bins at the last step equal the
    tracker hook's summary (both saw every batch's σ and x0 losses), the tracker's log values
    are in the stats record, and its state is checkpointed under its key."""
    data = _digits()
    tracker = GapTracker(_curve())
    monitor = GapMonitor(_curve(), data, sigmas=[1.0], n=8, log_every=3)
    train(_tiny(3, log_every=3), data, tmp_path / "r", hooks=[tracker, monitor], progress=False)
    (record,) = [r for r in read_stats(tmp_path / "r" / "stats.jsonl") if r.step == 3]
    bins = record.extra["gap_bins"]
    assert sum(r["count"] for r in bins) > 0
    assert tracker.summary() == monitor.tracker.summary()  # same batches, same arithmetic
    rows = [r for r in monitor.tracker.summary() if r["gap"] is not None]
    assert [r["gap"] for r in bins if r["gap"] is not None] == pytest.approx(
        [r["gap"] for r in rows], rel=1e-12
    )
    logged = {k: v for k, v in record.extra.items() if k.startswith(("gap/", "ratio/"))}
    assert logged == pytest.approx(tracker.log_dict())
    saved = _ckpt(tmp_path / "r")["hooks"]["gap_tracker"]
    assert torch.equal(saved["moments"], tracker.state_dict()["moments"])
    assert 0 < float(saved["moments"][:, 0].sum()) <= 3 * 8  # 3 batches of 8, decayed


@pytest.mark.slow
def test_a_resumed_run_with_the_monitor_writes_the_uninterrupted_runs_stats(tmp_path):
    """The monitor's tracker state is checkpointed: a run stopped at step 3 and resumed to step
    6 writes the same stats.jsonl lines (gap and gap_bins included; timings aside) as a run of
    6 steps. A monitor that drops the saved state logs other gap_bins from the same batches."""
    data = _digits(20)
    config = {"log_every": 2, "checkpoint_every": 3}

    def monitor() -> GapMonitor:
        return GapMonitor(_curve(), data, sigmas=[1.0], n=8, log_every=2)

    full, cut = tmp_path / "full", tmp_path / "cut"
    train(_tiny(6, **config), data, full, hooks=[monitor()], progress=False)
    train(_tiny(3, **config), data, cut, hooks=[monitor()], progress=False)
    forgot = tmp_path / "forgot"
    shutil.copytree(cut, forgot)
    saved = _ckpt(cut)["hooks"]["gap_monitor"]["tracker"]
    assert float(saved["moments"][:, 0].sum()) > 0
    train(_tiny(6, **config), data, cut, resume=True, hooks=[monitor()], progress=False)
    records = _records(full)
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    assert all("gap_bins" in r and "gap" in r for r in records if r["step"] != 3)
    assert _records(cut) == records

    class Forgetful(GapMonitor):
        def load_state_dict(self, state) -> None:
            pass

    forgetful = Forgetful(_curve(), data, sigmas=[1.0], n=8, log_every=2)
    train(_tiny(6, **config), data, forgot, resume=True, hooks=[forgetful], progress=False)
    assert _records(forgot)[:2] == records[:2]
    assert _records(forgot)[2]["gap_bins"] != records[2]["gap_bins"]

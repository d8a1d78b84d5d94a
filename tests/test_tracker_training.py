"""GapTracker inside lossfloor's own trainer: as a hook (its log values and checkpointed state)
and as the --monitor hook's per-bin gap of the training losses (``gap_bins``)."""

from __future__ import annotations

import pytest
import torch
from test_training_hooks import _ckpt, _curve, _digits, _tiny

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

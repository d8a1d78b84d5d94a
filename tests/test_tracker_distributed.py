"""GapTracker under torchrun (2 gloo CPU processes, tests/tracker_worker.py): with reduce="auto"
each rank's summary sums the bins over both and equals one process fed the whole batches."""

from __future__ import annotations

import pytest
from test_tracker import power_curve
from torchrun import run_workers
from tracker_worker import batches

from lossfloor.tracker import GapTracker


@pytest.mark.slow
def test_two_ranks_reduced_summarise_as_one_process_on_the_whole_batches(tmp_path):
    from pathlib import Path

    results = run_workers(Path(__file__).parent / "tracker_worker.py", tmp_path)
    whole = GapTracker(power_curve(), process="ve", target="x0", half_life=300)
    for s, loss in batches():
        whole.update(loss, sigma=s)
    for result in results:  # rank 0 and rank 1 alike
        assert result["logged"] == pytest.approx(whole.log_dict(), rel=1e-9)
        for got, want in zip(result["rows"], whole.summary(), strict=True):
            assert (got["gap"] is None) == (want["gap"] is None)
            if want["gap"] is not None:
                assert got["gap"] == pytest.approx(want["gap"], rel=1e-9)
                assert got["count"] == pytest.approx(want["count"], rel=1e-12)

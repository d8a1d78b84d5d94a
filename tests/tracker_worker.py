"""Worker of tests/test_tracker_distributed.py, under torchrun with 2 gloo processes: a
GapTracker with reduce="auto" fed this rank's half of each batch; its summary on every rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_tracker import power_curve  # tests/ is on the path (torchrun.run_workers)

from lossfloor.tracker import GapTracker


def batches():
    """The same 5 batches of 64 (σ, x0 loss) on every rank."""
    g = torch.Generator().manual_seed(0)
    ref = GapTracker(power_curve(), process="ve", target="x0")
    for _ in range(5):
        s = torch.exp(torch.rand(64, generator=g, dtype=torch.float64) * 9 - 4)
        yield s, ref.optimal_loss(s) + 0.05 * torch.rand(64, generator=g, dtype=torch.float64)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tracker = GapTracker(power_curve(), process="ve", target="x0", half_life=300, reduce="auto")
    for s, loss in batches():
        part = slice(32 * rank, 32 * (rank + 1))
        tracker.update(loss[part], sigma=s[part])
    rows = tracker.summary()
    logged = tracker.log_dict()
    (out / f"result-{rank}.json").write_text(json.dumps({"rows": rows, "logged": logged}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

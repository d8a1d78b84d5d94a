"""Training statistics: one ``StatsRecord`` per log interval, a line of stats.jsonl.

Per-σ-bin x0 losses use 8 log-spaced bins over EDM's sampling range [0.002, 80]: bin k holds
σ ∈ (edges[k], edges[k+1]], the first and last bins open-ended (they also hold σ ≤ 0.002 and
σ > 80).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lossfloor.distributed import Group
from lossfloor.errors import UserError
from lossfloor.training.hooks import Batch, Hook, LogStep, Reducer

Tensor = torch.Tensor

SIGMA_BIN_EDGES: list[float] = np.geomspace(0.002, 80.0, 9).tolist()


@dataclass
class StatsRecord:
    """Means over the log interval that ends at ``step``.

    loss: mean over steps of the batch loss (what is minimised); loss_x0: mean over images of the
    x0 loss mean‖D − x0‖²; bin_loss_x0[k], bin_count[k]: the same over the images whose σ fell in
    bin k (None where none did); lr: the learning rate of the last step; seconds: training time
    of the run so far; step_seconds, images_per_s: over the interval (hooks excluded);
    extra: what hooks added (e.g. the monitor's ``gap``); callback_seconds: the hooks' time
    (``training.loop``).
    """

    step: int
    images: int
    loss: float
    loss_x0: float
    bin_loss_x0: list[float | None]
    bin_count: list[int]
    lr: float
    seconds: float
    step_seconds: float
    images_per_s: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    callback_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The stats.jsonl object: the fields, then ``extra``'s keys, then callback_seconds."""
        names = [f.name for f in fields(self) if f.name not in ("extra", "callback_seconds")]
        out = {name: getattr(self, name) for name in names}
        out.update(self.extra)
        if self.callback_seconds is not None:
            out["callback_seconds"] = self.callback_seconds
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StatsRecord:
        """Inverse of ``to_json``: keys that are not fields go to ``extra``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = names - set(obj) - {"callback_seconds"}
        if missing:
            raise UserError(f"a stats record needs {sorted(missing)}")
        known = {k: v for k, v in obj.items() if k in names}
        return cls(**known, extra={k: v for k, v in obj.items() if k not in names})


def parse_stats_line(line: str) -> StatsRecord | None:
    """The record on one stats.jsonl line; None for a line an interrupted write cut off."""
    try:
        obj = json.loads(line)
        return StatsRecord.from_json(obj) if isinstance(obj, dict) else None
    except (json.JSONDecodeError, UserError, TypeError):
        return None


def read_stats(path: str | Path) -> list[StatsRecord]:
    """The records of a stats.jsonl file, skipping lines an interrupted write cut off."""
    records = (parse_stats_line(line) for line in Path(path).read_text().splitlines())
    return [r for r in records if r is not None]


class StatsAccumulator(Hook):
    """The trainer's statistics as a hook: sums over one log interval of the batch loss, the x0
    loss and image count per σ bin, and the steps' time. ``on_log`` sums the bins over the
    ``group``'s processes (each added its rows), returns the interval's means (``StatsRecord``'s
    loss fields and timings) and starts the next interval; its state (``state_dict``, every
    process's rows summed) is checkpointed under "stats" so a resume continues the interval."""

    state_key = "stats"

    def __init__(self, device: torch.device, group: Reducer | None = None) -> None:
        self.device = device
        self.group: Reducer = Group(device=device) if group is None else group
        self.inner_edges = torch.tensor(SIGMA_BIN_EDGES[1:-1], dtype=torch.float64)
        self._reset()

    def _reset(self) -> None:
        """An empty interval."""
        nbins = len(SIGMA_BIN_EDGES) - 1
        self.bin_sum = torch.zeros(nbins, dtype=torch.float64, device=self.device)
        self.bin_count = torch.zeros(nbins, dtype=torch.float64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps = 0
        self.images = 0
        self.seconds = 0.0

    def add(self, loss: Tensor, sigma: Tensor, loss_x0: Tensor, seconds: float) -> None:
        """One step: its batch loss, the images' σ (CPU) and per-image x0 losses, its time."""
        bins = torch.bucketize(sigma, self.inner_edges).to(self.bin_sum.device)
        self.bin_sum.index_add_(0, bins, loss_x0.detach().double())
        self.bin_count.index_add_(0, bins, torch.ones_like(loss_x0, dtype=torch.float64))
        self.loss_sum += loss.detach().double()
        self.steps += 1
        self.images += len(sigma)
        self.seconds += seconds

    def on_batch(self, batch: Batch) -> None:
        """``add`` the batch: it needs the whole batch's mean loss and the step's time."""
        if batch.batch_loss is None or batch.seconds is None:
            raise UserError("the training statistics need each batch's batch_loss and seconds")
        self.add(batch.batch_loss, batch.sigma, batch.loss_x0, batch.seconds)

    def on_log(self, log: LogStep) -> dict[str, Any]:
        """``reduce``, the interval's values (``values``), then a new interval."""
        self.reduce(self.group)
        out = self.values()
        self._reset()
        return out

    def state_dict(self) -> dict[str, Any]:
        """The sums so far, for a checkpoint taken inside a log interval: the per-bin sums and
        counts summed over the group's processes (each holds its rows; ``self`` is left as it
        is), so that a resume in any number of processes continues the interval."""
        bins = torch.stack([self.bin_sum, self.bin_count])
        if self.group.world > 1:
            bins = self.group.sum(bins)
        return {
            "bin_sum": bins[0].cpu(),
            "bin_count": bins[1].cpu(),
            "loss_sum": self.loss_sum.cpu(),
            "steps": self.steps,
            "images": int(bins[1].sum()),
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the interval of ``state_dict``: the main process takes the per-bin sums of
        all processes (``reduce`` adds the others' rows from here on); the batch-loss sum and
        step count are every process's."""
        device = self.bin_sum.device
        if self.group.main:
            self.bin_sum = state["bin_sum"].to(device, torch.float64)
            self.bin_count = state["bin_count"].to(device, torch.float64)
            self.images = int(state["images"])
        self.loss_sum = state["loss_sum"].to(device, torch.float64)
        self.steps = int(state["steps"])
        self.seconds = float(state["seconds"])

    def reduce(self, group: Reducer) -> None:
        """Sum the per-bin x0-loss sums and image counts over ``group``'s processes, each of
        which added its rows of every batch (the batch losses added are already the global
        batch's); the time stays this process's."""
        if group.world == 1:
            return
        sums = group.sum(torch.stack([self.bin_sum, self.bin_count]))
        self.bin_sum, self.bin_count = sums[0], sums[1]
        self.images = int(self.bin_count.sum())

    def values(self) -> dict[str, Any]:
        """The interval's means: ``StatsRecord``'s loss, loss_x0, bin_loss_x0, bin_count,
        step_seconds and images_per_s."""
        counts = self.bin_count.cpu().tolist()
        sums = self.bin_sum.cpu().tolist()
        return {
            "loss": float(self.loss_sum) / self.steps,
            "loss_x0": sum(sums) / sum(counts),
            "bin_loss_x0": [s / c if c else None for s, c in zip(sums, counts, strict=True)],
            "bin_count": [int(c) for c in counts],
            "step_seconds": self.seconds / self.steps,
            "images_per_s": self.images / self.seconds if self.seconds > 0 else None,
        }

    def record(self, step: int, images: int, lr: float, total_seconds: float) -> StatsRecord:
        """The interval's record (``images``, ``lr``, ``total_seconds``: of the run)."""
        return StatsRecord(step=step, images=images, lr=lr, seconds=total_seconds, **self.values())

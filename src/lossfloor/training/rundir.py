"""A training run directory: starting, resuming and saving.

Files (their names: ``lossfloor.runfiles``): ``config.json`` (everything that defines the run,
``training.config.run_config``), ``stats.jsonl`` (one ``StatsRecord`` per log interval),
``checkpoint-latest.pt`` (written atomically) and optional ``checkpoint-<step>.pt`` snapshots.
Checkpoints are read through ``lossfloor.models.load_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lossfloor.data import Dataset
from lossfloor.errors import UserError
from lossfloor.io import atomic_path, save_with, write_json
from lossfloor.models import check_compatible, load_checkpoint
from lossfloor.runfiles import CHECKPOINT_LATEST, CONFIG, STATS, snapshot_name
from lossfloor.training.config import RESOLVED_FIELDS, RESUMABLE_FIELDS
from lossfloor.training.stats import parse_stats_line


def check_resumable(saved: dict[str, Any], current: dict[str, Any], dataset: Dataset) -> None:
    """UserError unless the run config ``current`` continues the checkpoint's ``saved``: same
    image shape, the same data, every training option equal except RESUMABLE_FIELDS, and the
    process, target and schedule resolving to the same configs (a name and its full config
    agree)."""
    check_compatible(saved, dataset)
    identity = {k: v for k, v in dataset.describe().items() if k != "name"}
    if any(saved["data"].get(k) != v for k, v in identity.items()):
        raise UserError(
            f"cannot resume: {dataset.name} is not the data this run was trained on "
            f"({saved['data']['name']}, sha256 {saved['data']['sha256'][:12]}…); pass that data"
        )
    changed = [
        (key, old, current["train"].get(key))
        for key, old in saved["train"].items()
        if key not in (*RESUMABLE_FIELDS, *RESOLVED_FIELDS) and old != current["train"].get(key)
    ]
    changed += [
        (key, saved[key], current[key]) for key in RESOLVED_FIELDS if saved[key] != current[key]
    ]
    if changed:
        key, old, new = changed[0]
        raise UserError(
            f"cannot resume: the run was trained with {key}={old!r}, not {new!r}; keep the "
            "run's value or start a new run"
        )


class RunDir:
    """The files of one run in ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def latest(self) -> Path:
        return self.path / CHECKPOINT_LATEST

    @property
    def stats(self) -> Path:
        return self.path / STATS

    def start(self, run_config: dict[str, Any]) -> None:
        """A new run: config.json and an empty stats.jsonl; UserError if a run is there."""
        if self.latest.exists():
            raise UserError(
                f"{self.path} already holds a run; resume it or choose another run directory"
            )
        write_json(self.path / CONFIG, run_config)
        with atomic_path(self.stats) as tmp:
            tmp.write_text("")

    def open_resume(self, run_config: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
        """The latest checkpoint, once ``check_resumable`` accepts ``run_config`` and dataset."""
        if not self.path.is_dir():
            raise UserError(f"cannot resume: run directory not found: {self.path}")
        if not self.latest.exists():
            raise UserError(
                f"cannot resume: {self.path} has no {CHECKPOINT_LATEST}; start a new run instead"
            )
        ckpt = load_checkpoint(self.latest, "cpu")
        check_resumable(ckpt["config"], run_config, dataset)
        return ckpt

    def continue_at(self, step: int, run_config: dict[str, Any]) -> None:
        """After a resume from ``step``: rewrite config.json, drop stats records after ``step``
        (and lines an interrupted write cut off)."""
        write_json(self.path / CONFIG, run_config)
        kept = []
        if self.stats.exists():
            for line in self.stats.read_text().splitlines():
                record = parse_stats_line(line)
                if record is not None and record.step <= step:
                    kept.append(line + "\n")
        with atomic_path(self.stats) as tmp:
            tmp.write_text("".join(kept))

    def save(self, ckpt: dict[str, Any], snapshot: bool) -> None:
        """``ckpt`` as checkpoint-latest.pt (atomically), and as checkpoint-<step>.pt if
        ``snapshot``."""
        save_with(self.latest, lambda p: torch.save(ckpt, p))
        if snapshot:
            path = self.path / snapshot_name(ckpt["step"])
            save_with(path, lambda p: torch.save(ckpt, p))

    def diverged(self, step: int, what: str) -> UserError:
        """The error that stops a run whose loss, gradient or weights became non-finite."""
        kept = (
            f"the last good checkpoint {self.latest} is kept"
            if self.latest.exists()
            else "no checkpoint had been written yet"
        )
        return UserError(
            f"training stopped at step {step}: {what}; {kept}; lower the learning rate (lr) or "
            "raise the warm-up (warmup) and start again"
        )

"""The layout of a training run directory: the one owner of its file names.

``config.json`` (everything that defines the run), ``stats.jsonl`` (one statistics record per
log interval), ``checkpoint-latest.pt`` (the last checkpoint) and optional
``checkpoint-<step>.pt`` snapshots (the step zero-padded to 8 digits). ``training`` writes
them, ``models`` and ``scaling.collection`` read them; all three take the names from here.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.json"
STATS = "stats.jsonl"
CHECKPOINT_LATEST = "checkpoint-latest.pt"
_SNAPSHOT = re.compile(r"checkpoint-(\d+)\.pt$")


def snapshot_name(step: int) -> str:
    """The file name of the snapshot at ``step``: checkpoint-<step, 8 digits>.pt."""
    return f"checkpoint-{step:08d}.pt"


def snapshot_step(name: str) -> int | None:
    """The step of a snapshot's file name (any number of digits), or None if ``name`` is not
    one (checkpoint-latest.pt is not a snapshot)."""
    match = _SNAPSHOT.match(name)
    return None if match is None else int(match.group(1))


def snapshots(run_dir: Path) -> dict[int, Path]:
    """step → path of every ``checkpoint-<step>.pt`` snapshot in ``run_dir``."""
    return {step: p for p in run_dir.iterdir() if (step := snapshot_step(p.name)) is not None}

"""RUNS.csv, the table a scaling fit reads: ``RunRow`` (one run's checkpoint at one σ, or the
total loss), ``read_runs`` (checked: a missing file or column, an empty file, a cell that is
not a finite number are one-line errors) and ``write_runs`` (atomic)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lossfloor.errors import UserError
from lossfloor.io import atomic_path

#: The columns RUNS.csv must have; ``collect`` writes these and EXTRA_COLUMNS.
COLUMNS = ("run", "params", "flops", "images_seen", "sigma", "loss")
EXTRA_COLUMNS = ("step", "loss_stderr", "optimal_loss")


@dataclass(frozen=True)
class RunRow:
    """One row of RUNS.csv: a run's checkpoint at one σ (None: the total loss)."""

    run: str
    params: float
    flops: float
    images_seen: float
    sigma: float | None
    loss: float
    extra: dict[str, str] = field(default_factory=dict)

    def x(self, name: str) -> float:
        """F: flops, params or images_seen."""
        return float(getattr(self, name))


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{path}, line {line}: {column} = {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UserError(f"{path}, line {line}: {column} = {text!r} is not finite")
    return value


def read_runs(path: str | os.PathLike[str]) -> list[RunRow]:
    """The rows of RUNS.csv; UserError for a missing file or column, an empty file, or a cell
    that is not a finite number (sigma may be empty: the total loss)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file not found: {p}")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise UserError(f"{p} is empty; expected a header {','.join(COLUMNS)} and rows")
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"{p}: missing column(s) {', '.join(missing)}; need {','.join(COLUMNS)}"
            )
        rows = []
        for i, rec in enumerate(reader, start=2):
            if any(rec.get(c) is None for c in COLUMNS):
                raise UserError(f"{p}, line {i}: fewer cells than columns")
            sigma_text = rec["sigma"].strip()
            sigma = None if sigma_text == "" else _number(p, i, "sigma", sigma_text)
            if sigma is not None and sigma <= 0:
                raise UserError(f"{p}, line {i}: sigma = {sigma_text} must be > 0 (or empty)")
            nums = {c: _number(p, i, c, rec[c]) for c in ("params", "flops", "images_seen", "loss")}
            extra = {k: v for k, v in rec.items() if k not in COLUMNS and k is not None}
            rows.append(RunRow(run=rec["run"], sigma=sigma, extra=extra, **nums))
    if not rows:
        raise UserError(f"{p} has a header but no rows")
    return rows


def write_runs(path: str | os.PathLike[str], rows: Sequence[RunRow]) -> None:
    """Write rows as RUNS.csv (COLUMNS, then the extra columns the rows carry), atomically."""
    extra = [c for c in EXTRA_COLUMNS if any(c in r.extra for r in rows)]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*COLUMNS, *extra])
        for r in rows:
            sigma = "" if r.sigma is None else repr(float(r.sigma))
            nums = [repr(float(v)) for v in (r.params, r.flops, r.images_seen)]
            w.writerow(
                [r.run, *nums, sigma, repr(float(r.loss)), *(r.extra.get(c, "") for c in extra)]
            )


# --- fitting ---------------------------------------------------------------------------------

"""Plain files for loops with no logger: one CSV row or one JSON line per bin and log step.

    from lossfloor.integrations.files import append_csv
    ...
    if step % 100 == 0:
        append_csv("gap.csv", tracker, step)

CSV columns: step, then a ``GapTracker.summary()`` row (sigma [VE sigma], loss, optimal_loss,
gap, gap_stderr [x0 units per element], ratio [J_θ/J*], count [decayed samples]); empty where a
bin has no samples. JSON lines: {"step": …, "bins": [rows]}. Both append (a log that grows as
training runs); the CSV header is written with the first row.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from lossfloor.tracker import GapTracker

#: The CSV header: a summary row's keys with their units.
CSV_HEADER = (
    "step", "sigma [VE sigma]", "loss [x0 per element]", "optimal_loss [x0 per element]",
    "gap [x0 per element]", "gap_stderr [x0 per element]", "ratio [loss/optimal_loss]",
    "count [decayed samples]",
)  # fmt: skip
ROW_KEYS = ("sigma", "loss", "optimal_loss", "gap", "gap_stderr", "ratio", "count")


def append_csv(
    path: str | os.PathLike[str], tracker: GapTracker, step: int
) -> list[dict[str, Any]]:
    """Append one row per bin at ``step`` (the header first if the file is new or empty);
    returns the summary rows."""
    rows = tracker.summary()
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        if new:
            out.writerow(CSV_HEADER)
        for row in rows:
            out.writerow([step, *("" if row[k] is None else row[k] for k in ROW_KEYS)])
    return rows


def append_jsonl(
    path: str | os.PathLike[str], tracker: GapTracker, step: int
) -> list[dict[str, Any]]:
    """Append {"step": step, "bins": summary rows} as one line; returns the rows."""
    rows = tracker.summary()
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "bins": rows}) + "\n")
    return rows

"""``lossfloor report``: one self-contained HTML page of a dataset's J*(σ), models' distance to
it, the floor, the schedule it implies, scaling fits and training runs, with the sentences that
read each figure and where the numbers came from.

``read_input`` reads each path (a result JSON by its header ``format``, a stats.jsonl file, a
run directory), ``group_by_data`` groups them by the data's fingerprint, ``sections`` builds one
section per input (figures drawn by the results' own ``plot`` on bare ``Figure``s), ``html``
assembles the page. An application layer: only the CLI imports it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

from lossfloor import __version__
from lossfloor.io import save_with
from lossfloor.report.inputs import DataGroup, Input, describe_data, group_by_data, read_input
from lossfloor.report.sections import Section, group_sections, sigma_star


def build_report(paths: Sequence[str], title: str | None = None, command: str | None = None) -> str:
    """The HTML page of the inputs at ``paths`` (read by ``read_input``; bad input: a one-line
    ``UserError``), titled ``title`` (default: the data's names), ``command`` in its footer."""
    import matplotlib

    groups = group_by_data([read_input(p) for p in paths])
    built = [(_heading(g), group_sections(g)) for g in groups]
    if title is None:
        names = [str((g.dataset or {}).get("name")) for g in groups if g.dataset]
        title = "lossfloor report: " + (", ".join(dict.fromkeys(names)) or "results")
    footer = [
        f"Made by lossfloor {__version__} (Python {platform.python_version()}, matplotlib "
        f"{matplotlib.__version__}) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    if command:
        footer.append(f"Command: {command}")
    from lossfloor.report.html import page

    return page(title, built, footer)


def write_report(
    paths: Sequence[str],
    out: str | os.PathLike[str],
    title: str | None = None,
    command: str | None = None,
) -> None:
    """``build_report`` written to ``out`` atomically."""
    text = build_report(paths, title, command)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    save_with(out, write)


def _heading(group: DataGroup) -> str:
    if group.fingerprint is None:
        return "Results whose files record no dataset"
    return "Data: " + describe_data(group.dataset)


__all__ = [
    "DataGroup",
    "Input",
    "Section",
    "build_report",
    "group_by_data",
    "read_input",
    "sigma_star",
    "write_report",
]

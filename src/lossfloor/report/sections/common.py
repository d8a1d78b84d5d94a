"""What the sections share: the ``Section`` record, the number and σ wording, the bare
figure every section draws on, and the provenance rows.

Units throughout: σ is the VE noise level (x = x0 + σ·ε, the data in [−1, 1]); losses are
per element, in x0 units (‖D(x) − x0‖²/D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lossfloor.plots import new_figure
from lossfloor.report.inputs import Input, describe_data

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


#: The sentence on units every figure's section ends its reading with.
UNITS = "σ: VE noise level (x = x0 + σ·ε, data in [−1, 1]); losses per element, in x0 units."


@dataclass
class Section:
    """A part of the page: a title, a figure (or none), the sentences that read it and the
    provenance (label → text)."""

    key: str
    title: str
    figure: Figure | None
    sentences: list[str]
    provenance: dict[str, str] = field(default_factory=dict)
    alt: str = ""
    #: A table shown under the figure: (header, rows of text).
    table: tuple[list[str], list[list[str]]] | None = None
    #: The one sentence the page's summary takes from the section.
    summary: str = ""


def g(x: float | None, digits: int = 3) -> str:
    """A number in ``digits`` significant figures ("n/a" for None, "≈ 0" below 1e-30)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) < 1e-30:
        return "≈ 0"
    return f"{x:.{digits}g}"


def pct(x: float) -> str:
    """A fraction as a percentage: two significant figures, whole percents from 100%."""
    return f"{100 * x:.0f}%" if x >= 1 else f"{100 * x:.2g}%"


def sigma_list(sigmas: Sequence[float]) -> str:
    """σ values in words: "σ = a", "σ = a, b and c", or "σ = a to b (k levels)" for more than
    four."""
    vals = [g(s) for s in sorted(sigmas)]
    if len(vals) > 4:
        return f"σ = {vals[0]} to {vals[-1]} ({len(vals)} levels)"
    return "σ = " + (vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " and " + vals[-1])


def bare_figure(
    rows: int, cols: int, size: tuple[float, float], **kw: Any
) -> tuple[Figure, list[Axes]]:
    """A bare ``Figure`` (no pyplot) of rows × cols axes, ``size`` inches."""
    return new_figure(rows, cols, size, pyplot=False, **kw)


def duration(seconds: float) -> str:
    """Seconds in words (s, min or h)."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def common_provenance(item: Input) -> dict[str, str]:
    """The rows every result has: the file, its kind, the lossfloor that wrote it, the data."""
    result = item.result
    out = {"file": item.path, "kind": item.kind}
    version = getattr(result, "lossfloor_version", None)
    out["written by"] = f"lossfloor {version}" if version else "lossfloor (version not recorded)"
    if item.dataset is not None:
        out["data"] = describe_data(item.dataset)
        if item.dataset.get("sha256"):
            out["data fingerprint (sha256)"] = str(item.dataset["sha256"])
    return out


#: What no result file records yet (said on the page, not guessed).
NOT_RECORDED = "not recorded in the file"


def run_provenance(item: Input, seconds: float | None) -> dict[str, str]:
    """The run's rows: the compute time (``seconds``, the result's own per-σ times), and from
    the file's ``provenance`` block (``lossfloor.provenance.describe_run``, written by the CLI)
    the software, the machine, the command and the wall-clock time, else "not recorded"."""
    run = getattr(item.result, "provenance", None)
    out = {"compute time": NOT_RECORDED if not seconds else duration(seconds)}
    if not isinstance(run, dict):
        out["torch version, CPU/GPU, command"] = NOT_RECORDED
        return out
    out["software"] = ", ".join(
        f"{name} {run[key]}"
        for key, name in (("lossfloor", "lossfloor"), ("torch", "torch"), ("python", "Python"))
        if key in run
    )
    machine = [str(run[key]) for key in ("cpu", "gpu") if run.get(key)]
    if "threads" in run:
        machine.append(f"{run['threads']} torch threads")
    out["CPU/GPU"] = ", ".join(machine) or NOT_RECORDED
    out["command"] = str(run.get("command", NOT_RECORDED))
    if "started" in run:
        wall = (
            f" ({duration(run['seconds'])})" if isinstance(run.get("seconds"), int | float) else ""
        )
        out["run"] = f"{run['started']} to {run.get('finished', '?')}{wall}"
    return out

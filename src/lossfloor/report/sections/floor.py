"""The floor's section: the generalising bracket, the N-trend and the verdict per σ."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lossfloor.report.inputs import Input, describe_data, json_text
from lossfloor.report.sections.common import (
    UNITS,
    Section,
    bare_figure,
    common_provenance,
    g,
    run_provenance,
    sigma_list,
)

if TYPE_CHECKING:
    from lossfloor.floor import Floor


def floor_section(item: Input) -> Section:
    """The bracket [J*_train, least held-out bound] and the N-trend; the verdict per σ."""
    f: Floor = item.result
    fig, axes = bare_figure(2, 1, (7.5, 9.0))
    f.plot(axes)
    fig.tight_layout()
    pts = sorted(f.points, key=lambda p: p.sigma)
    held = describe_data(f.heldout)
    text = [
        "The generalising floor: J* of the training set (lower edge) is reached only by "
        "memorising; the least loss of a fixed denoiser on held-out data "
        f"({held}) is the upper edge. A model that generalises lands in between."
    ]
    by: dict[str, list[float]] = {}
    for p in pts:
        by.setdefault(p.verdict, []).append(p.sigma)
    says = {
        "memorised": "J*_train ≈ 0: a model's loss below the upper edge there is memorisation, "
        "not progress",
        "rising": "J* still grows with N: the training set is too small to pin the population "
        "optimum",
        "converged": "J* no longer changes with N: J*_train is the population's, a gap above it "
        "is underfitting",
        "undecided": "more repeats or draws decide",
    }
    text += [f"{verdict.capitalize()} at {sigma_list(s)}: {says.get(verdict, '')}."
             for verdict, s in by.items()]  # fmt: skip
    widest = max(pts, key=lambda p: p.upper - p.lower)
    text.append(
        f"The bracket is widest at σ ≈ {g(widest.sigma)} ({g(widest.lower)} to "
        f"{g(widest.upper)}): that is where the floor's uncertainty about the reachable loss "
        "is largest. Lower panel: J* of nested subsets of size n relative to the full N (a "
        "line still rising at the full N: more data would raise J*)."
    )
    text.append(UNITS)
    prov = common_provenance(item)
    prov["held-out data"] = held
    prov["options"] = json_text(f.params)
    prov.update(run_provenance(item, None))
    alt = "upper: the floor's bracket against σ; lower: J* of subsets against their size"
    summary = "Floor: " + "; ".join(f"{v} at {sigma_list(s)}" for v, s in by.items()) + "."
    return Section("floor", "Generalising floor", fig, text, prov, alt, summary=summary)

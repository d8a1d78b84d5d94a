"""One section builder per kind of input, a module each (``estimate``, ``models``: the overview
and each diagnosis, ``floor``, ``schedule``, ``scaling``, ``training``; ``common``: what they
share): the figure (drawn by the result's own ``plot`` on the axes of a bare
``matplotlib.figure.Figure``: no pyplot, no backend), the sentences that read it, computed from
its numbers, and where the numbers came from (provenance).

Units throughout: σ is the VE noise level (x = x0 + σ·ε, the data in [−1, 1]); losses are
per element, in x0 units (‖D(x) − x0‖²/D).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lossfloor.report.inputs import DataGroup, Input
from lossfloor.report.sections.common import Section, g, sigma_list
from lossfloor.report.sections.estimate import curve_section, curve_star
from lossfloor.report.sections.floor import floor_section
from lossfloor.report.sections.models import diagnosis_section, overview_section
from lossfloor.report.sections.scaling import scaling_section
from lossfloor.report.sections.schedule import schedule_section
from lossfloor.report.sections.training import training_section
from lossfloor.schedules.tabulated import sigma_star

if TYPE_CHECKING:
    from lossfloor.diagnosis import Diagnosis
    from lossfloor.floor import Floor

__all__ = ["Section", "g", "group_sections", "group_star", "sigma_list", "sigma_star"]


def group_sections(group: DataGroup) -> list[Section]:
    """The sections of one dataset's inputs: the overview (J* and models), then each input's."""
    star = group_star(group)
    builders: dict[str, Callable[[Input, int], Section]] = {
        "estimate": lambda i, k: curve_section(i),
        "diagnosis": lambda i, k: diagnosis_section(i, star, k),
        "floor": lambda i, k: floor_section(i),
        "schedule": lambda i, k: schedule_section(i),
        "scaling-fit": scaling_section,
        "training": training_section,
    }
    out: list[Section] = []
    overview = overview_section(group, star)
    if overview is not None:
        out.append(overview)
    counts: dict[str, int] = {}
    for item in group.inputs:
        counts[item.kind] = counts.get(item.kind, 0) + 1
        section = builders[item.kind](item, counts[item.kind])
        if len(group.of(item.kind)) > 1 and item.kind in ("estimate", "floor", "schedule"):
            section.key += f"-{counts[item.kind]}"
            section.title += f" ({counts[item.kind]})"
        out.append(section)
    return out


def group_star(group: DataGroup) -> float | None:
    """The data's σ*: from its first estimate, else from J*_train of its floor (relative to the
    data variance), else from a diagnosis' J* (relative to its largest J*)."""
    if group.of("estimate"):
        return curve_star(group.of("estimate")[0].result)[0]
    if group.of("floor"):
        f: Floor = group.of("floor")[0].result
        lows = np.array(sorted((p.sigma, p.lower) for p in f.points))
        return sigma_star(lows[:, 0], lows[:, 1], f.data_variance)
    if group.of("diagnosis"):
        d: Diagnosis = group.of("diagnosis")[0].result
        optimal = np.array(sorted((p.sigma, p.optimal_loss) for p in d.points))
        return sigma_star(optimal[:, 0], optimal[:, 1], d.optimal_top)
    return None

"""lossfloor: how low a diffusion model's loss can go (arXiv 2506.13763).

Everything inside works in VE coordinates (x_t = x0 + σ·ε) and per-element x0 units.

The public face, imported on first use (PEP 562), so that ``import lossfloor`` stays light::

    import lossfloor

    curve = lossfloor.estimate_curve("digits", [0.1, 1.0, 10.0], "full", outer=512, seed=0)

Data (``load_dataset``, ``Dataset``), the optimal loss (``estimate_curve``, ``make_estimator``,
``Curve``), a model's gap to it (``diagnose``, ``Diagnosis``), the data-size floor
(``estimate_floor``, ``Floor``), scaling fits (``fit_scaling``, ``collect_runs``, ``read_runs``,
``ScalingFit``, ``RunRow``), the optimal-loss schedule's table (``ScheduleTable``), the base of
these results (``Result``: save, load, CSV) and the registries of estimators, processes, targets
and schedules.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The library never prints: notes and progress lines are records of the "lossfloor.*" loggers,
# silent unless the program configures logging (the CLI shows them on stderr).
logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Public name → (module, attribute in it).
_EXPORTS: dict[str, tuple[str, str]] = {
    "Dataset": ("lossfloor.data.dataset", "Dataset"),
    "load_dataset": ("lossfloor.data.dataset", "load_dataset"),
    "Curve": ("lossfloor.optimal.curve", "Curve"),
    "CurvePoint": ("lossfloor.optimal.curve", "CurvePoint"),
    "estimate_curve": ("lossfloor.optimal.estimate", "estimate_curve"),
    "Estimator": ("lossfloor.optimal.estimators", "Estimator"),
    "make_estimator": ("lossfloor.optimal.estimators", "make_estimator"),
    "ESTIMATORS": ("lossfloor.optimal.estimators", "ESTIMATORS"),
    "Diagnosis": ("lossfloor.diagnosis", "Diagnosis"),
    "GapPoint": ("lossfloor.diagnosis", "GapPoint"),
    "GapTracker": ("lossfloor.tracker", "GapTracker"),
    "diagnose": ("lossfloor.diagnosis", "diagnose"),
    "Floor": ("lossfloor.floor", "Floor"),
    "FloorPoint": ("lossfloor.floor", "FloorPoint"),
    "estimate_floor": ("lossfloor.floor", "floor"),  # not ``floor``: that is the submodule
    "RunRow": ("lossfloor.scaling", "RunRow"),
    "ScalingFit": ("lossfloor.scaling", "ScalingFit"),
    "collect_runs": ("lossfloor.scaling.collection", "collect"),
    "fit_scaling": ("lossfloor.scaling", "fit_scaling"),
    "read_runs": ("lossfloor.scaling", "read_runs"),
    "PROCESSES": ("lossfloor.diffusion.processes", "PROCESSES"),
    "get_process": ("lossfloor.diffusion.processes", "get_process"),
    "TARGETS": ("lossfloor.diffusion.targets", "TARGETS"),
    "get_target": ("lossfloor.diffusion.targets", "get_target"),
    "SCHEDULES": ("lossfloor.schedules", "SCHEDULES"),
    "get_schedule": ("lossfloor.schedules", "get_schedule"),
    "UserError": ("lossfloor.errors", "UserError"),
    "Result": ("lossfloor.results", "Result"),
    "ScheduleTable": ("lossfloor.schedules.optimal", "ScheduleTable"),
}

__all__ = [
    "__version__",
    "Curve",
    "CurvePoint",
    "Dataset",
    "Diagnosis",
    "ESTIMATORS",
    "Estimator",
    "Floor",
    "FloorPoint",
    "GapPoint",
    "GapTracker",
    "PROCESSES",
    "Result",
    "RunRow",
    "SCHEDULES",
    "ScalingFit",
    "ScheduleTable",
    "TARGETS",
    "UserError",
    "collect_runs",
    "diagnose",
    "estimate_curve",
    "estimate_floor",
    "fit_scaling",
    "get_process",
    "get_schedule",
    "get_target",
    "load_dataset",
    "make_estimator",
    "read_runs",
]

if TYPE_CHECKING:  # what a type checker and an IDE see; at run time, ``__getattr__``
    from lossfloor.data.dataset import Dataset, load_dataset
    from lossfloor.diagnosis import Diagnosis, GapPoint, diagnose
    from lossfloor.diffusion.processes import PROCESSES, get_process
    from lossfloor.diffusion.targets import TARGETS, get_target
    from lossfloor.errors import UserError
    from lossfloor.floor import Floor, FloorPoint
    from lossfloor.floor import floor as estimate_floor
    from lossfloor.optimal.curve import Curve, CurvePoint
    from lossfloor.optimal.estimate import estimate_curve
    from lossfloor.optimal.estimators import ESTIMATORS, Estimator, make_estimator
    from lossfloor.results import Result
    from lossfloor.scaling import RunRow, ScalingFit, fit_scaling, read_runs
    from lossfloor.scaling.collection import collect as collect_runs
    from lossfloor.schedules import SCHEDULES, get_schedule
    from lossfloor.schedules.optimal import ScheduleTable
    from lossfloor.tracker import GapTracker


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lossfloor' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

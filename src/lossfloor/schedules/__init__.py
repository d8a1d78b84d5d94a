"""Training objectives as noise-level densities p(σ) and loss weights w(σ), in VE σ and x0 units.

A training loss is  E_{σ~p} [ w(σ) · mean‖D(x0 + σε, σ) − x0‖² ],  so its optimal value is
E_{σ~p}[w(σ)·J*(σ)]. ``density_ln_sigma`` is the density of ln σ (what a quadrature on log σ needs).
Schedules are created by name and parameters through ``SCHEDULES`` (``get_schedule``), and
``to_config()`` records them so that ``get_schedule(config)`` rebuilds them exactly.
``SCHEDULE_NAMES`` are the schedules that need no data; ``OptimalLossSchedule`` ("optimal")
is built from an optimal-loss curve (``OptimalLossSchedule.from_curve``).
"""

from lossfloor.schedules.base import (
    SCHEDULE_NAMES,
    SCHEDULES,
    EDMSchedule,
    FlowMatchingSchedule,
    LogitNormalFlowSchedule,
    NoiseSchedule,
    ProcessTimeSchedule,
    VESchedule,
    VPSchedule,
    dlog_sigma_ve_dt,
    get_schedule,
)
from lossfloor.schedules.optimal import OptimalLossSchedule  # registers "optimal"

__all__ = [
    "SCHEDULES",
    "SCHEDULE_NAMES",
    "EDMSchedule",
    "FlowMatchingSchedule",
    "LogitNormalFlowSchedule",
    "NoiseSchedule",
    "OptimalLossSchedule",
    "ProcessTimeSchedule",
    "VESchedule",
    "VPSchedule",
    "dlog_sigma_ve_dt",
    "get_schedule",
]

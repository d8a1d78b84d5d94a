"""Training objectives as noise-level densities p(σ) and loss weights w(σ), in VE σ and x0 units.

A training loss is  E_{σ~p} [ w(σ) · mean‖D(x0 + σε, σ) − x0‖² ],  so its optimal value is
E_{σ~p}[w(σ)·J*(σ)]. ``density_ln_sigma`` is the density of ln σ (what a quadrature on log σ needs).
"""

from lossfloor.schedules.base import (
    SCHEDULE_NAMES,
    EDMSchedule,
    FlowMatchingSchedule,
    LogitNormalFlowSchedule,
    NoiseSchedule,
    VESchedule,
    VPSchedule,
    get_schedule,
)

__all__ = [
    "SCHEDULE_NAMES",
    "EDMSchedule",
    "FlowMatchingSchedule",
    "LogitNormalFlowSchedule",
    "NoiseSchedule",
    "VESchedule",
    "VPSchedule",
    "get_schedule",
]

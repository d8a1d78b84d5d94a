"""diffusers schedulers in lossfloor's terms: a discrete VP table and a prediction target."""

from __future__ import annotations

from typing import Any

import torch

from lossfloor.diffusion.processes import VPDiscrete
from lossfloor.diffusion.targets import Target, get_target
from lossfloor.errors import UserError

Tensor = torch.Tensor

PREDICTION_TARGETS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
"""diffusers' ``prediction_type`` → lossfloor's target (v: Salimans–Ho, diffusers' get_velocity)."""


def scheduler_table(scheduler: Any, where: str) -> tuple[Tensor, str]:
    """(ᾱ of the timesteps a diffusers scheduler's σ̃ is finite at, float64; its prediction
    type): any scheduler with ``alphas_cumprod`` (DDPM, DDIM, Euler, DPM-Solver, …); a
    zero-terminal-SNR table (ᾱ = 0, σ̃ = ∞ at the end, or Euler's 2⁻²⁴ stand-in above its
    predecessor) is cut to its longest prefix with 0 < ᾱ strictly decreasing. UserError
    (naming ``where``) for a scheduler without the table or with another prediction type."""
    name = type(scheduler).__name__
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise UserError(f"{where}: scheduler {name} has no alphas_cumprod table")
    ac = torch.as_tensor(ac, dtype=torch.float64)
    ok = (ac > 0) & torch.cat([torch.ones(1, dtype=torch.bool), ac[1:] < ac[:-1]])
    kept = int(torch.cumprod(ok.long(), 0).sum())
    if kept < 2:
        raise UserError(f"{where}: alphas_cumprod of {name} is not a decreasing table")
    config = getattr(scheduler, "config", {})
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TARGETS:
        raise UserError(f"{where}: prediction_type {prediction!r} is not supported "
                        f"(supported: {', '.join(PREDICTION_TARGETS)})")  # fmt: skip
    return ac[:kept], prediction


def scheduler_units(scheduler: Any, where: str) -> tuple[VPDiscrete, Target]:
    """The scheduler's process (``VPDiscrete`` of ``scheduler_table``: timestep t → σ̃(t)) and
    the target of its ``prediction_type``."""
    table, prediction = scheduler_table(scheduler, where)
    return VPDiscrete(table), get_target(PREDICTION_TARGETS[prediction])

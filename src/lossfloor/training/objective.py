"""The objective a training run minimises: the given one (checked against the run's config and
model) or the config's (``DenoisingLoss``, ``UncertaintyLoss`` with ``uncertainty``), and what
the trainer asks of it (its learnable parameters; whether its draws split across processes)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch

from lossfloor.diffusion.denoiser import Denoiser
from lossfloor.errors import UserError
from lossfloor.schedules import get_schedule
from lossfloor.training.config import TrainConfig
from lossfloor.training.loss import DenoisingLoss, UncertaintyLoss


class _Learnable(Protocol):
    """An objective with learnable parameters (``UncertaintyLoss``): they move with it."""

    def to(self, device: torch.device) -> Any: ...


def schedule_name(spec: Any) -> str:
    """The (lower-case) name a schedule spec gives: a name or a config's ``name``."""
    return str(spec.get("name", "") if isinstance(spec, dict) else spec).lower()


def objective_parameters(objective: Any) -> list[torch.nn.Parameter]:
    """An objective's learnable parameters (``parameters()``; none without it)."""
    own = getattr(objective, "parameters", None)
    return list(own()) if own is not None else []


def takes_part(objective: Callable[..., Any]) -> bool:
    """Whether ``objective`` can be called with ``part=`` (named, or through ``**kwargs``)."""
    params = inspect.signature(objective).parameters.values()
    return any(p.name == "part" or p.kind is p.VAR_KEYWORD for p in params)


def resolve_objective(
    objective: DenoisingLoss | None,
    config: TrainConfig,
    denoiser: Denoiser,
    world: int,
    device: torch.device,
) -> DenoisingLoss:
    """The given objective (whose schedule ``config.schedule`` must name) or the config's,
    checked against the model ``denoiser`` and the number of processes ``world``; one with
    learnable parameters is moved to ``device``."""
    spec = config.schedule
    if objective is None:
        schedule = get_schedule(spec, sigma_data=config.sigma_data)
        objective = (
            UncertaintyLoss(schedule, seed=config.seed)
            if config.uncertainty
            else DenoisingLoss(schedule)
        )
    elif isinstance(objective, UncertaintyLoss) != config.uncertainty:
        raise UserError(
            f"the objective is {type(objective).__name__} but the config has uncertainty="
            f"{config.uncertainty}; set TrainConfig.uncertainty to match"
        )
    elif objective.schedule.name.lower() != schedule_name(spec):
        raise UserError(
            f"the objective's schedule is {objective.schedule.name!r} but the config names "
            f"{schedule_name(spec)!r}; set TrainConfig.schedule to the objective's"
        )
    objective.check(denoiser)
    if objective_parameters(objective):
        if world > 1:
            raise UserError(
                f"the objective {type(objective).__name__} has learnable parameters, which "
                "data-parallel training does not average; train it in one process"
            )
        cast(_Learnable, objective).to(device)
    if world > 1 and not takes_part(objective):
        raise UserError(
            f"the objective {type(objective).__name__} takes no part=(start, total), so its "
            "draws cannot be split across processes; train it in one process"
        )
    return objective

"""Scaling-law rows measured from training runs (docs/method.md §6): ``collect`` diagnoses
every checkpoint of every run (``run_checkpoints``) and counts a training step's FLOPs
(``step_flops``), giving the ``RunRow``s that ``lossfloor.scaling.fit`` fits. It loads models,
trains a step and diagnoses, so it sits above the fit (which imports nothing above
``lossfloor.optimal``); torch and those modules are imported when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lossfloor.device import resolve_device
from lossfloor.errors import ParameterError, UserError
from lossfloor.scaling.fit import RunRow

if TYPE_CHECKING:
    import torch

    from lossfloor.data import Dataset


def run_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint of a run, by step: the ``checkpoint-<step>.pt``
    snapshots and ``checkpoint-latest.pt`` where its step has no snapshot."""
    from lossfloor.models import load_checkpoint
    from lossfloor.runfiles import CHECKPOINT_LATEST, snapshots

    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"run directory not found: {root}")
    found = snapshots(root)
    latest = root / CHECKPOINT_LATEST
    if latest.is_file():
        step = int(load_checkpoint(latest)["step"])
        found.setdefault(step, latest)
    if not found:
        raise UserError(f"{root} holds no checkpoint (checkpoint-latest.pt or -<step>.pt)")
    return sorted(found.items())


def step_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one training step, counted by ``torch.utils.flop_counter.FlopCounterMode``:
    ``step()`` returns the loss (forward) and its ``backward()`` is counted too. The
    optimiser's update (elementwise) is not a counted op."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step().backward()
    return int(counter.get_total_flops())


def denoiser_step_flops(denoiser: Any, config: dict[str, Any], dataset: Dataset) -> int:
    """FLOPs of one training step of a run (its batch size and schedule, forward + backward
    of ``DenoisingLoss`` on the run's model), by ``step_flops``. The weights are restored to
    eval mode without gradients afterwards."""
    import torch

    from lossfloor.schedules import get_schedule
    from lossfloor.training.loss import DenoisingLoss

    batch = int(config["train"]["batch"])
    objective = DenoisingLoss(get_schedule(config["schedule"]))
    idx = torch.arange(batch) % dataset.n
    x0 = dataset.x[idx]
    labels = None if config["model"].get("num_classes") is None else dataset.labels[idx]
    gs, gn = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    denoiser.train().requires_grad_(True)
    try:
        return step_flops(
            lambda: objective(denoiser, x0, labels, g_sigma=gs, g_noise=gn).loss.mean()
        )
    finally:
        denoiser.zero_grad(set_to_none=True)
        denoiser.eval().requires_grad_(False)


def collect(
    run_dirs: Sequence[str | os.PathLike[str]],
    dataset: Dataset,
    sigmas: Sequence[float],
    *,
    outer: int = 2048,
    seed: int = 0,
    batch: int = 256,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> list[RunRow]:
    """RUNS.csv rows of every checkpoint of every run (EMA weights): per σ, the model's loss
    J_θ(σ) on the training set on ``diagnose``'s fixed draws (outer, seed; J* cached across
    checkpoints); the total E_{σ~p}[w(σ)·J_θ(σ)] under the run's own schedule by
    ``Total.compute``'s quadrature (J_θ linear in ln σ between the grid's σ, trapezoid on a
    finer grid, plus the schedule's mass outside the grid times the end values); the
    parameter count; FLOPs = ``denoiser_step_flops`` × step; images_seen = step × batch.
    Extra columns: step, loss_stderr, optimal_loss (J* on the same draws). ``device``:
    ``"auto"`` is cuda when available (``lossfloor.device``); the models load there."""
    from lossfloor.diagnosis import diagnose
    from lossfloor.models import load_model
    from lossfloor.optimal.curve import Total
    from lossfloor.schedules import get_schedule

    if len(sigmas) < 2:
        raise ParameterError("sigmas", list(sigmas), "the total loss needs at least 2 σ values")
    device = resolve_device(device)
    grid = np.array(sorted(sigmas), dtype=np.float64)
    rows: list[RunRow] = []
    for run_dir in run_dirs:
        name = Path(run_dir).name
        per_step = None
        for step, path in run_checkpoints(run_dir):
            model, info = load_model(str(path), dataset, device)
            config = info["config"]
            if per_step is None:
                per_step = denoiser_step_flops(model, config, dataset)
            cond = bool(info["conditional"])
            diag = diagnose(model, dataset, [float(s) for s in grid], outer=outer, seed=seed,
                            batch=batch, conditional=cond, use_labels=cond, device=device,
                            progress=progress)  # fmt: skip
            common = {
                "run": name,
                "params": float(config["parameters"]),
                "flops": float(per_step * step),
                "images_seen": float(step * config["train"]["batch"]),
            }
            for p in diag.points:
                extra = {"step": str(step), "loss_stderr": repr(float(p.model_loss_stderr)),
                         "optimal_loss": repr(float(p.optimal_loss))}  # fmt: skip
                rows.append(RunRow(**common, sigma=p.sigma, loss=p.model_loss, extra=extra))
            schedule = get_schedule(config["schedule"])
            model_total = Total.compute(
                grid,
                np.array([p.model_loss for p in diag.points]),
                np.array([p.model_loss_stderr for p in diag.points]),
                schedule,
            )
            opt_total = Total.compute(
                grid, np.array([p.optimal_loss for p in diag.points]), np.zeros(grid.size),
                schedule,
            )  # fmt: skip
            extra = {"step": str(step), "loss_stderr": repr(float(model_total.stderr)),
                     "optimal_loss": repr(float(opt_total.optimal_loss))}  # fmt: skip
            rows.append(RunRow(**common, sigma=None, loss=model_total.optimal_loss, extra=extra))
    return rows

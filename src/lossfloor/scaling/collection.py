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
from lossfloor.scaling.runs import RunRow

if TYPE_CHECKING:
    import torch

    from lossfloor.data import Dataset
    from lossfloor.diagnosis import Diagnosis


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
    conditional = config["model"].get("num_classes") is not None
    labels = dataset.labels[idx] if conditional and dataset.labels is not None else None
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
    ``"auto"`` is cuda when available (``lossfloor.device``); the models load there. Of
    Gaussian items, diagnose's draws x0 = m + s⊙z and J* of their mixture."""
    if len(sigmas) < 2:
        raise ParameterError("sigmas", list(sigmas), "the total loss needs at least 2 σ values")
    device = resolve_device(device)
    grid = np.array(sorted(sigmas), dtype=np.float64)
    rows: list[RunRow] = []
    for run_dir in run_dirs:
        rows += _run_rows(run_dir, dataset, grid, outer, seed, batch, device, progress)
    return rows


def _run_rows(
    run_dir: str | os.PathLike[str],
    dataset: Dataset,
    grid: np.ndarray,
    outer: int,
    seed: int,
    batch: int,
    device: str | torch.device,
    progress: bool,
) -> list[RunRow]:
    """The rows of every checkpoint of one run (``collect``; FLOPs per step counted once)."""
    from lossfloor.diagnosis import diagnose
    from lossfloor.models import load_model

    name = Path(run_dir).name
    per_step = None
    rows: list[RunRow] = []
    for step, path in run_checkpoints(run_dir):
        model, info = load_model(str(path), dataset, device)
        config = info["config"]
        if per_step is None:
            per_step = denoiser_step_flops(model, config, dataset)
        cond = bool(info["conditional"])
        diag = diagnose(model, dataset, [float(s) for s in grid], outer=outer, seed=seed,
                        batch=batch, conditional=cond, use_labels=cond, device=device,
                        progress=progress)  # fmt: skip
        rows += _checkpoint_rows(name, step, per_step, config, grid, diag)
    return rows


def _checkpoint_rows(
    name: str, step: int, per_step: int, config: dict[str, Any], grid: np.ndarray, diag: Diagnosis
) -> list[RunRow]:
    """One checkpoint's rows: one per σ of its diagnosis, then the total under the run's
    schedule (``Total.compute``)."""
    from lossfloor.optimal.curve import Total
    from lossfloor.schedules import get_schedule

    def row(sigma: float | None, loss: float, stderr: float, optimal: float) -> RunRow:
        extra = {"step": str(step), "loss_stderr": repr(float(stderr)),
                 "optimal_loss": repr(float(optimal))}  # fmt: skip
        return RunRow(run=name, params=float(config["parameters"]),
                      flops=float(per_step * step),
                      images_seen=float(step * config["train"]["batch"]),
                      sigma=sigma, loss=loss, extra=extra)  # fmt: skip

    rows = [row(p.sigma, p.model_loss, p.model_loss_stderr, p.optimal_loss) for p in diag.points]
    schedule = get_schedule(config["schedule"])
    model_total = Total.compute(
        grid,
        np.array([p.model_loss for p in diag.points]),
        np.array([p.model_loss_stderr for p in diag.points]),
        schedule,
    )
    opt_total = Total.compute(
        grid, np.array([p.optimal_loss for p in diag.points]), np.zeros(grid.size), schedule
    )
    rows.append(row(None, model_total.optimal_loss, model_total.stderr, opt_total.optimal_loss))
    return rows

"""Diagnosis: a model's per-σ loss against the optimal loss on the same draws (docs/method.md §4).

    gap(σ) = J_θ(σ) − J*(σ),  J_θ(σ) = E‖D_θ(x0 + σε, σ) − x0‖²/D,  J*(σ) = E‖μ(x0 + σε) − x0‖²/D

Both terms are evaluated on the same (x0, ε) draws (``lossfloor.optimal.outer``), so the gap's
standard error comes from the paired per-sample differences and is small. Reading a gap: below
σ* (where J* ≈ 0) the training set's optimum is the memorising denoiser, which a model that
generalises never reaches, so a gap there is partly the price of generalisation, not only
underfitting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lossfloor import __version__
from lossfloor.data import Dataset
from lossfloor.errors import UserError
from lossfloor.optimal import Full
from lossfloor.optimal.outer import (
    OUTER_BLOCK,
    OuterPlan,
    block_noise,
    choose_dtype,
    make_pools,
    mean_and_stderr,
    per_sample_values,
)

Tensor = torch.Tensor
DenoiserFn = Callable[..., Tensor]


def loss_factor_of(model: DenoiserFn, sigma: float) -> float | None:
    """The model's target-units/x0-units loss factor at σ, if it is a lossfloor Denoiser."""
    fn = getattr(model, "loss_factor", None)
    return None if fn is None else float(fn(torch.tensor(sigma, dtype=torch.float64)))


@torch.no_grad()
def model_per_sample_loss(
    model: DenoiserFn,
    dataset: Dataset,
    plan: OuterPlan,
    sigma: float,
    batch: int,
    device: torch.device,
    labels: Tensor | None,
) -> Tensor:
    """‖D_θ(x0 + σε, σ) − x0‖²/D for every outer draw of ``plan`` (float64)."""
    m = plan.sources.numel()
    out = torch.empty(m, dtype=torch.float64)
    for j in range(plan.blocks):
        lo, hi = j * OUTER_BLOCK, min(m, (j + 1) * OUTER_BLOCK)
        eps = block_noise(plan.seed, j, hi - lo, dataset.dim)
        for b in range(lo, hi, batch):
            e = min(hi, b + batch)
            src = plan.sources[b:e]
            x0 = dataset.x[src].to(device)
            noise = eps[b - lo : e - lo].reshape(x0.shape).to(device=device, dtype=x0.dtype)
            sig = torch.full((e - b,), sigma, dtype=x0.dtype, device=device)
            lab = None if labels is None else labels[src].to(device)
            pred = model(x0 + sigma * noise, sig, lab)
            out[b:e] = (pred.double() - x0.double()).pow(2).flatten(1).mean(1).cpu()
    return out


def diagnose(
    model: DenoiserFn,
    dataset: Dataset,
    sigmas: Sequence[float],
    *,
    outer: int = 2048,
    seed: int = 0,
    batch: int = 256,
    conditional: bool = False,
    use_labels: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per σ: model loss, optimal loss, the paired gap and its standard error (per element, x0
    units; also in the model's target units when it is a lossfloor Denoiser)."""
    from tqdm.auto import tqdm

    if not sigmas:
        raise UserError("the σ list is empty; give at least one σ > 0")
    device = torch.device(device)
    plan = OuterPlan.build(dataset.x, dataset.labels, outer, seed, conditional)
    labels = dataset.labels if use_labels else None
    if use_labels and labels is None:
        raise UserError("the model is class-conditional but the dataset has no labels")
    pools = {torch.float32: make_pools(plan, torch.float32, device)}
    points = []
    for sigma in tqdm(sigmas, disable=not progress, desc="diagnose", unit="σ", leave=False):
        t0 = time.perf_counter()
        dtype = choose_dtype("auto", pools[torch.float32], sigma)
        if dtype not in pools:
            pools[dtype] = make_pools(plan, dtype, device)
        opt = per_sample_values(plan, Full(), sigma, dtype, device, pools[dtype]).direct
        mod = model_per_sample_loss(model, dataset, plan, sigma, batch, device, labels)
        if not torch.isfinite(mod).all():
            raise UserError(f"the model's output is not finite at σ = {sigma:g}")
        (jm, jm_se), (jo, jo_se) = mean_and_stderr(mod), mean_and_stderr(opt)
        gap, gap_se = mean_and_stderr(mod - opt)
        point = {
            "sigma": sigma,
            "model_loss": jm,
            "model_loss_stderr": jm_se,
            "optimal_loss": jo,
            "optimal_loss_stderr": jo_se,
            "gap": gap,
            "gap_stderr": gap_se,
            "relative_gap": gap / jo if jo > 0 else None,
            "seconds": time.perf_counter() - t0,
        }
        factor = loss_factor_of(model, sigma)
        if factor is not None:
            point["loss_factor"] = factor
            point["model_loss_target"] = point["model_loss"] * factor
            point["optimal_loss_target"] = point["optimal_loss"] * factor
            point["gap_target"] = point["gap"] * factor
        points.append(point)
    return {
        **(record or {}),
        "dataset": {**dataset.describe(), "conditional": conditional},
        "outer": outer,
        "seed": seed,
        "per_element": True,
        "units": "VE sigma, x0 per element; *_target in the model's target units",
        "lossfloor_version": __version__,
        "points": points,
    }

"""The optimal-loss curve of a dataset: J*(σ) over a σ grid with standard errors
(docs/method.md §2–3).

    J*(σ) = E‖x0 − μ(x0 + σε)‖²/D = (A − E‖μ‖²)/D,   μ(x) = E[x0 | x_t = x]

estimated from M outer draws shared across the grid; μ from one of the estimators.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lossfloor import __version__
from lossfloor.data import mean_and_variance
from lossfloor.errors import UserError
from lossfloor.optimal.curve import Curve, total_optimal_loss
from lossfloor.optimal.estimators import Estimator, Pool
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.outer import (
    Moments,
    OuterPlan,
    base_dtype,
    choose_dtype,
    make_pools,
    per_sample_values,
    resolve_form,
)
from lossfloor.schedules import NoiseSchedule


def estimate_curve(
    data: torch.Tensor,
    sigmas: Sequence[float],
    estimator: Estimator,
    *,
    labels: torch.Tensor | None = None,
    conditional: bool = False,
    outer: int | None = None,
    seed: int = 0,
    form: str = "auto",
    precision: str = "auto",
    device: str | torch.device = "cpu",
    process: Any = None,
    target: Any = None,
    schedule: NoiseSchedule | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    record: dict[str, Any] | None = None,
    done: dict[float, dict[str, Any]] | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> Curve:
    """J*(σ) per element for each σ (VE) of ``sigmas`` on the empirical set ``data`` (N×...).

    ``outer`` M defaults to N (every point once). ``process``/``target`` (lossfloor.diffusion)
    add each σ's process time t and the value in the target's units. ``done`` holds points
    already computed (resume); ``on_point`` is called with each new point (checkpointing).
    """
    n = data.shape[0]
    if n < 1:
        raise UserError("the dataset is empty")
    if not sigmas:
        raise UserError("the σ list is empty; give at least one σ > 0")
    for s in sigmas:
        if not s > 0:
            raise UserError(f"every σ must be > 0, got {s}")
    device = torch.device(device)
    m = n if outer is None else outer
    plan = OuterPlan.build(data, labels, m, seed, conditional)
    for members, _ in plan.groups:
        estimator.check(members.numel())
    form_used = resolve_form(form, estimator)
    pools_by_dtype: dict[torch.dtype, list[Pool]] = {}

    def pools(dtype: torch.dtype) -> list[Pool]:
        if dtype not in pools_by_dtype:
            pools_by_dtype[dtype] = make_pools(plan, dtype, device)
        return pools_by_dtype[dtype]

    done = dict(done or {})
    todo = [s for s in sigmas if s not in done]
    bar = tqdm(
        total=len(todo) * plan.blocks, disable=not progress, unit="block", desc="J*(σ)", leave=False
    )
    points = []
    for sigma in sigmas:
        if sigma in done:
            points.append(done[sigma])
            continue
        bar.set_postfix(sigma=f"{sigma:.4g}")
        dtype = choose_dtype(precision, pools(base_dtype(precision)), sigma)
        t0 = time.perf_counter()
        samples = per_sample_values(
            plan, estimator, sigma, dtype, device, pools(dtype), tile_bytes, bar.update
        )
        seconds = time.perf_counter() - t0
        mom = Moments.from_samples(samples)
        value, se = mom.pick(form_used)
        point: dict[str, Any] = {
            "sigma": sigma,
            "t": float(process.t_of_sigma_ve(sigma)) if process is not None else sigma,
            "optimal_loss": value,
            "stderr": se,
            "optimal_loss_target": None,
            "seconds": seconds,
            "closed": mom.closed,
            "closed_stderr": mom.closed_stderr,
            "direct": mom.direct,
            "direct_stderr": mom.direct_stderr,
            "combined_weight_closed": mom.weight_closed,
            "dtype": str(dtype).removeprefix("torch."),
        }
        if process is not None and target is not None:
            factor = float(target.loss_factor(process.t_of_sigma_ve(sigma), process))
            point["optimal_loss_target"] = value * factor
        points.append(point)
        if on_point is not None:
            on_point(point)
    bar.close()
    rec: dict[str, Any] = {
        **(record or {}),
        "estimator": {**estimator.params(), "outer": m, "seed": seed, "form": form_used},
        "per_element": True,
        "data_variance": mean_and_variance(data)[1],
        "precision": precision,
        "lossfloor_version": __version__,
        "points": points,
        "total": None,
    }
    curve = Curve.from_record(rec)
    if schedule is not None:
        rec["total"] = total_optimal_loss(curve.sigmas, curve.values, curve.stderrs, schedule)
    return curve

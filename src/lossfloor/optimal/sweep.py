"""The grid sweep: every σ of a grid from one pass over the draws, for an estimator that sweeps
grids (``capabilities.sweeps_grid``: gram, ``Gram.grid_values``), where ``estimate_curve``
can (``sweeps``); its numbers equal the estimator's σ by σ.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from lossfloor.optimal.blocks import outer_blocks
from lossfloor.optimal.curve import CurvePoint
from lossfloor.optimal.estimators import PerSample
from lossfloor.optimal.gram import Gram
from lossfloor.optimal.precision import Overflow, finite_samples
from lossfloor.seeding import Stream, generator_for

if TYPE_CHECKING:
    from lossfloor.optimal.estimate import EstimateRun


def sweeps(run: EstimateRun) -> bool:
    """Whether the whole grid is one sweep (``Gram.grid_values``): an estimator that sweeps
    grids (``capabilities.sweeps_grid``: gram) on plain draws, one pool (in memory, sharded or
    streamed), fixed sizes; else it runs σ by σ like the others."""
    return (
        run.estimator.capabilities.sweeps_grid
        and run.draws == "plain"
        and run.adaptive is None
        and len(run.plan.groups) == 1
    )


def grid_points(run: EstimateRun, sigmas: Sequence[float]) -> dict[float, CurvePoint]:
    """Every σ of ``sigmas`` from one sweep over the draws per dtype (the σ that overflow
    float32 under ``auto`` again in float64: the ``Overflow`` policy); each point's
    ``seconds`` is its dtype's sweep time over its σ."""
    overflow = Overflow(run.precision)
    by_dtype: dict[torch.dtype, list[float]] = {}
    for sigma in sigmas:
        by_dtype.setdefault(run.pools.dtype_at(run.precision, sigma), []).append(sigma)
    points: dict[float, CurvePoint] = {}
    while by_dtype:
        dtype, group_sigmas = by_dtype.popitem()
        t0 = time.perf_counter()
        samples = _grid_values(run, dtype, group_sigmas)
        seconds = (time.perf_counter() - t0) / len(group_sigmas)
        for sigma, s in zip(group_sigmas, samples, strict=True):
            if not finite_samples(s):
                if not overflow.retries(dtype):
                    raise overflow.error(sigma, dtype)
                by_dtype.setdefault(torch.float64, []).append(sigma)
                continue
            points[sigma] = run.point(sigma, s, dtype, seconds)
            run.save(points[sigma])
    return points


def _grid_values(run: EstimateRun, dtype: torch.dtype, sigmas: Sequence[float]) -> list[PerSample]:
    """Per-sample values at every σ of ``sigmas`` on the plan's plain draws, block by block
    (the draws and inner streams of ``per_sample_values``: equal to gram σ by σ)."""
    estimator, plan, device = cast(Gram, run.estimator), run.plan, run.pools.device
    pool = run.pools(dtype)[0]
    closed = [torch.empty(plan.outer, dtype=torch.float64) for _ in sigmas]
    direct = [torch.empty(plan.outer, dtype=torch.float64) for _ in sigmas]
    for block in outer_blocks(plan.sources, plan.seed, pool.dim):
        noise = block.noise.to(device=device, dtype=dtype)
        gens = [generator_for(plan.seed, Stream.INNER, block.index) for _ in sigmas]
        src = block.sources.to(device)
        for i, s in enumerate(estimator.grid_values(pool, src, noise, sigmas, gens)):
            closed[i][block.lo : block.hi] = s.closed.cpu()
            direct[i][block.lo : block.hi] = s.direct.cpu()
            run.on_block()
    return [PerSample(closed=c, direct=d) for c, d in zip(closed, direct, strict=True)]

"""The grid sweep: every σ of a grid from one pass over the draws, for an estimator that sweeps
grids (``capabilities.sweeps_grid``: gram, ``Gram.grid_values``), where ``estimate_curve``
can (``sweeps``); its numbers equal the estimator's σ by σ (bitwise on plain draws, on
tilted ones up to the rounding of ε·Xᵀ = z·Xᵀ + (x_c − x_s)·Xᵀ/2σ).

Conditional estimates sweep each class pool (the plan's groups) in turn, block by block, as
``per_sample_values`` does; adaptive sizes sweep the pilot for the whole grid, then the blocks
beyond it that some σ needs (each σ only as far as its own M). With a checkpoint, each
finished block's values of every σ are saved (``_Blocks``) and an interrupted sweep resumes at
its first unfinished block with the same numbers.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from lossfloor.data.chunked import ChunkedDataset
from lossfloor.optimal.adaptive import adaptive_outer
from lossfloor.optimal.blocks import _Values, outer_blocks
from lossfloor.optimal.checkpoint import Checkpoint, checkpoint_key
from lossfloor.optimal.curve import CurvePoint
from lossfloor.optimal.draws import OUTER_BLOCK, join_samples, tilt_toward
from lossfloor.optimal.estimators import PerSample
from lossfloor.optimal.gram import Gram, small_ops
from lossfloor.optimal.moments import Moments
from lossfloor.optimal.precision import Overflow, finite_samples
from lossfloor.seeding import Stream, generator_for

if TYPE_CHECKING:
    from lossfloor.optimal.estimate import EstimateRun

#: The prefix of a checkpoint's units that hold a sweep's finished blocks (not points).
BLOCK_UNIT = "block "


def sweeps(run: EstimateRun) -> bool:
    """Whether the whole grid is one sweep (``Gram.grid_values``): an estimator that sweeps
    grids (``capabilities.sweeps_grid``: gram): with its pools held in memory by one process,
    any draws (plain or tilted), conditional or not, fixed or adaptive sizes; on several
    processes or streamed (one pool: ``Pool.products``), plain draws at fixed sizes. Else it
    runs σ by σ like the others."""
    one_process = run.group.world == 1 and not isinstance(run.plan.data, ChunkedDataset)
    return run.estimator.capabilities.sweeps_grid and (
        one_process or (run.draws == "plain" and run.adaptive is None and len(run.plan.groups) == 1)
    )


def grid_points(
    run: EstimateRun,
    sigmas: Sequence[float],
    alone: Callable[[float], CurvePoint],
    finish: Callable[[CurvePoint], CurvePoint],
) -> dict[float, CurvePoint]:
    """Every σ of ``sigmas`` from sweeps over the draws, one per dtype (the σ that overflow
    float32 under ``auto`` again in float64: the ``Overflow`` policy), each point ``finish``-ed
    (the nearest-point bound) and saved; with adaptive sizes ``_adaptive_points``. ``alone``:
    the point of one σ computed σ by σ (where an adaptive σ's extra draws overflow). Each
    point's ``seconds`` is its share of its sweeps' time."""
    if run.adaptive is not None:
        return _adaptive_points(run, sigmas, alone, finish)
    points: dict[float, CurvePoint] = {}
    for sigma, (s, dtype, seconds) in _swept(run, sigmas, run.plan.outer).items():
        points[sigma] = finish(run.point(sigma, s, dtype, seconds))
        run.save(points[sigma])
    _drop_blocks(run.saved)
    return points


def _swept(
    run: EstimateRun, sigmas: Sequence[float], m: int
) -> dict[float, tuple[PerSample, torch.dtype, float]]:
    """(values on the first m draws, dtype, seconds) per σ: one sweep per dtype, the σ whose
    values overflow float32 under ``auto`` again in float64."""
    overflow = Overflow(run.precision)
    by_dtype: dict[torch.dtype, list[float]] = {}
    for sigma in sigmas:
        by_dtype.setdefault(run.pools.dtype_at(run.precision, sigma), []).append(sigma)
    out: dict[float, tuple[PerSample, torch.dtype, float]] = {}
    while by_dtype:
        dtype, group = by_dtype.popitem()
        t0 = time.perf_counter()
        samples = _grid_values(run, dtype, group, [m] * len(group))
        seconds = (time.perf_counter() - t0) / len(group)
        for sigma, s in zip(group, samples, strict=True):
            if finite_samples(s):
                out[sigma] = (s, dtype, seconds)
            elif overflow.retries(dtype):
                by_dtype.setdefault(torch.float64, []).append(sigma)
            else:
                raise overflow.error(sigma, dtype)
    return {sigma: out[sigma] for sigma in sigmas}


def _adaptive_points(
    run: EstimateRun,
    sigmas: Sequence[float],
    alone: Callable[[float], CurvePoint],
    finish: Callable[[CurvePoint], CurvePoint],
) -> dict[float, CurvePoint]:
    """``adaptive.adaptive_values`` for the whole grid: the pilot's draws in one sweep, each
    σ's M from them (``adaptive_outer``), then one sweep per dtype over the blocks beyond the
    pilot, each σ as far as its M (a σ whose extra draws overflow its dtype: ``alone``, which
    redoes all of them in float64 as σ by σ). The same values as gram σ by σ."""
    target, pilot = cast(tuple[float, int], run.adaptive)
    first = _swept(run, sigmas, pilot)
    sizes = {}
    for sigma, (s, _, _) in first.items():
        value, se = Moments.from_samples(s).pick(run.form)
        sizes[sigma] = adaptive_outer(run.plan, pilot, value, se, target)
    by_dtype: dict[torch.dtype, list[float]] = {}
    for sigma in sigmas:
        if sizes[sigma] > pilot:
            by_dtype.setdefault(first[sigma][1], []).append(sigma)
    rest: dict[float, tuple[PerSample, float]] = {}
    for dtype, group in by_dtype.items():
        t0 = time.perf_counter()
        ends = [sizes[s] for s in group]
        samples = _grid_values(run, dtype, group, ends, pilot // OUTER_BLOCK)
        seconds = (time.perf_counter() - t0) / len(group)
        rest.update((s, (v, seconds)) for s, v in zip(group, samples, strict=True))
    points: dict[float, CurvePoint] = {}
    for sigma in sigmas:
        s, dtype, seconds = first[sigma]
        if sigma in rest:
            more, more_seconds = rest[sigma]
            if not finite_samples(more):
                points[sigma] = finish(alone(sigma))
                run.save(points[sigma])
                continue
            s, seconds = join_samples(s, more), seconds + more_seconds
        used = (sizes[sigma], run.estimator)
        points[sigma] = finish(run.point(sigma, s, dtype, seconds, used))
        run.save(points[sigma])
    _drop_blocks(run.saved)
    return points


def _grid_values(
    run: EstimateRun,
    dtype: torch.dtype,
    sigmas: Sequence[float],
    ends: Sequence[int],
    first: int = 0,
) -> list[PerSample]:
    """Per-sample values at every σ_i of ``sigmas`` on the plan's draws from block ``first`` to
    draw ``ends[i]`` (whole blocks, or M), block by block, each class pool's draws in turn;
    the draws (plain or tilted, ``tilt_toward``), inner streams and weighing of tilted values
    (``_Values.weigh``) of ``per_sample_values``: equal to gram σ by σ. With a checkpoint, each
    finished block is saved and a rerun starts at the first unfinished one (``_Blocks``)."""
    estimator, plan, device = cast(Gram, run.estimator), run.plan, run.pools.device
    pools = run.pools(dtype)
    tilted = run.draws == "tilted"
    start = first * OUTER_BLOCK
    acc = [_Values.empty(end - start, tilted) for end in ends]
    saved = None if run.saved is None else _Blocks(run.saved, dtype, sigmas, ends, first)
    resume = first if saved is None else saved.restore(acc)
    sources = plan.sources[: max(ends)]
    with small_ops():  # the blocks' small ops in one thread, their GEMMs in torch's
        for block in outer_blocks(sources, plan.seed, pools[0].dim, first=resume):
            live = [i for i, end in enumerate(ends) if block.lo < end]
            gens = [generator_for(plan.seed, Stream.INNER, block.index) for _ in live]
            at = block.lo - start
            for g, ((_, local), pool) in enumerate(zip(plan.groups, pools, strict=True)):
                src = block.sources
                sel = torch.nonzero(local[src] >= 0).flatten() if len(plan.groups) > 1 else None
                s_local = (local[src] if sel is None else local[src[sel]]).to(device)
                if s_local.numel() == 0:
                    continue
                plain = block.noise if sel is None else block.noise[sel]
                toward: list[torch.Tensor] | None = None
                weights: list[torch.Tensor] | None = None
                if tilted and pool.n > 1:
                    tilts = [tilt_toward(plan, block.index, g, pool, s_local, plain, sigmas[i],
                                         run.pools.tilts) for i in live]  # fmt: skip
                    toward, weights = [t for t, _ in tilts], [w for _, w in tilts]
                eps = plain.to(device=device, dtype=dtype)
                outs = estimator.grid_values(pool, s_local, eps, [sigmas[i] for i in live], gens,
                                             toward)  # fmt: skip
                where = slice(at, block.hi - start) if sel is None else sel + at
                for k, i in enumerate(live):
                    w = None if weights is None else weights[k]
                    out = outs[k] if w is None else acc[i].weigh(outs[k], w, pool, sigmas[i], dtype)
                    acc[i].put(where, out, w)
            for _ in live:
                run.on_block()
            if saved is not None:
                saved.add(block.index, slice(at, block.hi - start), live, acc)
    return [a.samples() for a in acc]


class _Blocks:
    """The finished blocks of one sweep (its dtype, σ, ends and first block: ``_grid_values``)
    as units of the estimate's checkpoint: per block, every live σ's closed and direct values
    (and likelihood ratios of tilted draws) as float64 bytes, and its running rounding sum, so
    a resumed sweep's values are the uninterrupted one's bitwise. At most M·S·2 float64 per
    sweep (M·S·3 on tilted draws), base64 in the checkpoint's JSON."""

    def __init__(
        self,
        saved: Checkpoint,
        dtype: torch.dtype,
        sigmas: Sequence[float],
        ends: Sequence[int],
        first: int,
    ) -> None:
        self.saved, self.first = saved, first
        self.prefix = BLOCK_UNIT + checkpoint_key([str(dtype), list(sigmas), list(ends), first])

    def restore(self, acc: list[_Values]) -> int:
        """Fill ``acc`` with the saved blocks' values; the first block not saved."""
        j = self.first
        while (unit := self.saved.done.get(f"{self.prefix} {j}")) is not None:
            at = (j - self.first) * OUTER_BLOCK
            where = slice(at, at + OUTER_BLOCK)  # the last block: to the end
            for k, i in enumerate(unit["sigma"]):
                values = acc[i]
                values.closed[where] = _decode(unit["closed"][k])
                values.direct[where] = _decode(unit["direct"][k])
                if values.ratio is not None:
                    values.ratio[where] = _decode(unit["ratio"][k])
                values.rounding = unit["rounding"][k]
            j += 1
        return j

    def add(self, block: int, where: slice, live: list[int], acc: list[_Values]) -> None:
        """Save block ``block`` (the values at ``where`` of the σ ``live``)."""
        self.saved.add(
            f"{self.prefix} {block}",
            {
                "sigma": live,
                "closed": [_encode(acc[i].closed[where]) for i in live],
                "direct": [_encode(acc[i].direct[where]) for i in live],
                "ratio": [None if (r := acc[i].ratio) is None else _encode(r[where]) for i in live],
                "rounding": [acc[i].rounding for i in live],
            },
        )


def _encode(values: torch.Tensor) -> str:
    """float64 values as base64 of their bytes (little-endian): exact."""
    return base64.b64encode(values.double().numpy().astype("<f8").tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    """``_encode``'s values back."""
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype="<f8").copy())


def _drop_blocks(saved: Checkpoint | None) -> None:
    """Remove the sweeps' blocks from the checkpoint (their points are saved)."""
    if saved is not None:
        saved.drop([name for name in saved.done if name.startswith(BLOCK_UNIT)])

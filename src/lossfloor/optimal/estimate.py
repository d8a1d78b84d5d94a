"""The optimal-loss curve of a dataset: J*(σ) over a σ grid with standard errors
(docs/method.md §2–3).

    J*(σ) = E‖x0 − μ(x0 + σε)‖²/D = (A − E‖μ‖²)/D,   μ(x) = E[x0 | x_t = x]

estimated from M outer draws shared across the grid; μ from one of the estimators. With a
``checkpoint`` file every finished σ is saved, and a rerun with the same data and options
resumes from it. What the points of one estimate share travels in one ``EstimateRun``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lossfloor.data import Dataset, mean_and_variance
from lossfloor.data.chunked import ChunkedDataset
from lossfloor.data.dataset import posterior_variance
from lossfloor.device import resolve_device
from lossfloor.diffusion import Process, Target
from lossfloor.distributed import Group, current
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.adaptive import adaptive_sizes, adaptive_values
from lossfloor.optimal.blocks import per_sample_values
from lossfloor.optimal.bound import BOUND_NEIGHBOURS, MEMORISED_SHARE, NearestPointBound
from lossfloor.optimal.checkpoint import Checkpoint, checkpoint_key
from lossfloor.optimal.curve import Curve, CurvePoint
from lossfloor.optimal.draws import TILT_NEIGHBOURS, Draws, OuterPlan, resolve_draws
from lossfloor.optimal.estimators import Estimator, EstimatorSpec, PerSample, as_estimator
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.mixture import check_gaussian
from lossfloor.optimal.moments import Form, curve_point, resolve_form
from lossfloor.optimal.neighbours import neighbour_tables
from lossfloor.optimal.pool_cache import PoolsByDtype
from lossfloor.optimal.precision import (
    Overflow,
    Precision,
    base_dtype,
    check_sigmas,
    finite_samples,
)
from lossfloor.optimal.shard import check_sharded
from lossfloor.optimal.stream import open_for_estimate
from lossfloor.optimal.sweep import BLOCK_UNIT, grid_points, sweeps
from lossfloor.progress import progress_bar
from lossfloor.schedules import NoiseSchedule
from lossfloor.sigmas import same_sigma

log = logging.getLogger(__name__)

#: Bumped when a checkpoint's points would no longer match what the code computes.
CHECKPOINT_FORMAT = "lossfloor-estimate-checkpoint/3"


def estimate_curve(
    data: str | torch.Tensor | Dataset | ChunkedDataset,
    sigmas: Sequence[float],
    estimator: EstimatorSpec = "full",
    *,
    labels: torch.Tensor | None = None,
    conditional: bool = False,
    outer: int | None = None,
    seed: int = 0,
    draws: Draws = "auto",
    form: Form = "auto",
    precision: Precision = "auto",
    device: str | torch.device = "auto",
    process: Process | None = None,
    target: Target | None = None,
    schedule: NoiseSchedule | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    checkpoint: str | os.PathLike[str] | None = None,
    restart: bool = False,
    progress: bool = True,
    target_rse: float | None = None,
    max_outer: int | None = None,
) -> Curve:
    """J*(σ) per element for each σ (VE) of ``sigmas`` on the empirical set ``data`` (N×...,
    or a Dataset: its labels, and its description recorded in the curve; or a dataset spec,
    ``load_dataset``'s, read in chunks where an in-memory estimate would not fit: the library's
    rule ``stream.must_stream``, as ``lossfloor estimate``'s). ``estimator``: an Estimator, a
    name or a config (``as_estimator``: a name's defaults depend on N, so a name is resolved
    here, once N is known).

    ``outer`` M defaults to N (every point once). ``draws``: ``tilted`` (importance-sampled
    noise toward each source's nearest neighbours, ``draws.tilted_noise``: right below σ*, where
    J* rests on rare draws), ``plain`` (ε ~ N(0, I), as in the paper) or ``auto`` (tilted for
    full, stratified and gram, plain for snis/dol/cdol: ``draws.resolve_draws``).
    ``process``/``target`` (lossfloor.diffusion) add each σ's process time t and the value in
    the target's units; ``schedule`` the total E_{σ~p}[w(σ)·J*(σ)]. With ``checkpoint`` (a
    file path), each finished σ is saved there and a rerun with the same data and options
    computes only the missing σ; the file is removed once the curve is complete. A checkpoint
    of other data or options is refused unless ``restart`` (which discards it).

    ``target_rse`` (adaptive sizes, ``adaptive.adaptive_values``): per σ, the number of draws
    (and the stratified estimator's far sample) for this relative standard error, from a pilot
    of the first ``outer`` draws (default ADAPTIVE_PILOT; whole blocks of OUTER_BLOCK) of a plan
    of ``max_outer`` (default ADAPTIVE_CAP × the pilot); each point records what it used.
    ``device``: ``"auto"`` is cuda when available, else cpu (``lossfloor.device``).

    A Dataset of Gaussian items (``Dataset.std``: VAE latents) gives J* of the mixture of its
    N(m_i, diag s_i²) (``mixture.MixturePool``; on K > 1 processes each holds its shard,
    ``shard.ShardedMixturePool``): the ``full`` estimator, plain draws, in memory
    (``mixture.check_gaussian`` refuses the rest).
    """
    device = resolve_device(device)
    group = current(device)
    with group.together():
        if isinstance(data, str):  # in chunks where memory is short: stream.must_stream
            data = open_for_estimate(data, group)
        x, labels, described = _unpack(data, labels, conditional, group)
        std = data.std if isinstance(data, Dataset) else None  # Gaussian items: mixture.py
        _check_grid(x, sigmas, outer)
        estimator = as_estimator(estimator, len(x))
        adaptive = adaptive_sizes(target_rse, max_outer, outer)
        m = adaptive[2] if adaptive is not None else len(x) if outer is None else outer
        plan = _plan(x, labels, m, seed, conditional, estimator, std)
        base_dtype(precision)  # an unknown policy fails before any work
        asked, draws = draws, resolve_draws(draws, estimator)
        if std is not None:
            draws = check_gaussian(estimator, asked)
        check_sharded(estimator, conditional, group, streamed=isinstance(x, ChunkedDataset))
    run = EstimateRun(
        plan=plan, estimator=estimator, form=resolve_form(form, estimator), draws=draws,
        precision=precision, pools=PoolsByDtype(plan, torch.device(device), group),
        tile_bytes=tile_bytes, process=process, target=target, group=group,
        adaptive=None if adaptive is None else adaptive[:2], progress=progress and group.main,
        variance=_variance(x, std),
    )  # fmt: skip
    options = run.options(seed)
    if group.world > 1:  # the same data and options on every process, before any work
        group.check_same("data", plan.fingerprint, f"sha256 {plan.fingerprint[:12]}…")
        group.check_same("options", json.dumps([options, list(sigmas)], default=str))
    if checkpoint is not None:
        run = dataclasses.replace(run, saved=_resume(run, checkpoint, options, sigmas, restart))
    curve = Curve(points=tuple(_estimate_points(run, sigmas)), data_variance=run.variance,
                  dataset=described, **options)  # fmt: skip
    if schedule is not None:
        curve = dataclasses.replace(curve, total=curve.total_under(schedule))
    if run.saved is not None:
        run.saved.remove()
    return curve


def _nothing() -> None:
    """The ``on_block`` of a run without a progress bar."""


@dataclass(frozen=True, kw_only=True)
class EstimateRun:
    """What every point of one estimate shares: the plan of the draws and its pools (per dtype,
    with the neighbour tables and tilts they gather), the estimator, the resolved form and
    draws, the precision policy, the tile size, the process and target (a point's t and value
    in target units), the processes, the checkpoint, adaptive sizes ((target rse, pilot) or
    None), the data variance (the bound's cap), whether to show progress, and the callback
    after each block of draws."""

    plan: OuterPlan
    estimator: Estimator
    form: str
    draws: str
    precision: str
    pools: PoolsByDtype
    tile_bytes: int
    process: Process | None
    target: Target | None
    group: Group
    adaptive: tuple[float, int] | None
    variance: float
    progress: bool
    saved: Checkpoint | None = None
    on_block: Callable[[], None] = _nothing

    def options(self, seed: int) -> dict:
        """The options a curve records and a checkpoint's key covers."""
        options = {
            "estimator": self.estimator.to_config(),
            "outer": self.plan.outer,
            "seed": seed,
            "draws": self.draws,
            "form": self.form,
            "precision": self.precision,
            "process": None if self.process is None else self.process.to_config(),
            "target": None if self.target is None else self.target.to_config(),
        }
        if self.adaptive is not None:  # only then: the checkpoint keys of others stay as they were
            options.update(target_rse=self.adaptive[0], pilot=self.adaptive[1])
        return options

    def values(
        self, sigma: float, estimator: Estimator, m: int, dtype: torch.dtype, first_block: int = 0
    ) -> tuple[PerSample, torch.dtype]:
        """``per_sample_values`` of ``estimator`` at σ on the plan's first m draws (from block
        ``first_block``) in ``dtype``, under the ``Overflow`` policy; and their dtype."""
        plan = self.plan.prefix(m)

        def compute(dtype: torch.dtype) -> PerSample:
            return per_sample_values(
                plan, estimator, sigma, dtype, self.pools.device, self.pools(dtype),
                self.tile_bytes, self.on_block, self.draws, self.pools.tilts, first_block,
            )  # fmt: skip

        return Overflow(self.precision).run(sigma, dtype, compute, finite_samples)

    def point(
        self,
        sigma: float,
        samples: PerSample,
        dtype: torch.dtype,
        seconds: float,
        used: tuple[int, Estimator] | None = None,
    ) -> CurvePoint:
        """The point at σ (``moments.curve_point``) in this run's form, draws and units."""
        return curve_point(sigma, samples, dtype, seconds, form=self.form, draws=self.draws,
                           process=self.process, target=self.target, used=used)  # fmt: skip

    def save(self, point: CurvePoint) -> None:
        """Add ``point`` to the checkpoint, if any (rank 0 writes)."""
        if self.saved is not None:
            with self.group.together():
                self.saved.add(_unit_name(point.sigma), point.to_json())


def _unpack(
    data: torch.Tensor | Dataset | ChunkedDataset,
    labels: torch.Tensor | None,
    conditional: bool,
    group: Group,
) -> tuple[torch.Tensor | ChunkedDataset, torch.Tensor | None, dict | None]:
    """(items, labels, the dataset's description for the result or None) of a tensor or a
    Dataset (whose labels serve unless ``labels`` are given), or a ChunkedDataset (summarised
    here: one pass over its blocks, split over the processes)."""
    if isinstance(data, ChunkedDataset):
        data.summarise(group)
    if isinstance(data, Dataset | ChunkedDataset):
        described = {**data.describe(), "conditional": conditional}
        items = data if isinstance(data, ChunkedDataset) else data.x
        return items, data.labels if labels is None else labels, described
    return data, labels, None


def _variance(x: torch.Tensor | ChunkedDataset, std: torch.Tensor | None) -> float:
    """The data's per-element variance, J*(σ → ∞): of the items' means, plus mean(s²) of
    Gaussian items' stds (``posterior_variance``)."""
    if isinstance(x, ChunkedDataset):
        return x.summary.variance
    return mean_and_variance(x)[1] + (0.0 if std is None else posterior_variance(std))


def _check_grid(
    x: torch.Tensor | ChunkedDataset, sigmas: Sequence[float], outer: int | None
) -> None:
    """A non-empty dataset, a valid σ grid, and M ≥ 2 where M defaults to N."""
    if len(x) < 1:
        raise UserError("the dataset is empty")
    check_sigmas(sigmas)
    if outer is None and len(x) < 2:
        raise ParameterError(
            "outer", None, f"the dataset has {len(x)} item and M defaults to N; a standard "
            "error needs M ≥ 2 outer samples: give M or more data",
        )  # fmt: skip


def _estimate_points(run: EstimateRun, sigmas: Sequence[float]) -> list[CurvePoint]:
    """One point per σ of ``sigmas``: from the run's checkpoint where it has one, else computed
    (and added to it); on K > 1 processes, each on its shard of the data. Where the draws use a
    neighbour index that lists every point, each computed point also gets the bound J* ≤
    ``upper_bound`` (``_with_bound``; the index then holds at least BOUND_NEIGHBOURS, but for
    streamed data)."""
    plan = run.plan
    found = {s: _find(run.saved, s) for s in sigmas}
    done = {s: p for s, p in found.items() if p is not None}
    todo = [s for s in sigmas if s not in done]
    bar = progress_bar(
        total=None if run.adaptive else len(todo) * plan.blocks, enabled=run.progress,
        unit="block", leave=False,
        desc=f"J*(σ) in blocks of the {plan.outer} draws ({plan.blocks} per σ)"
        if run.adaptive is None
        else f"J*(σ) in blocks of up to {plan.outer} draws per σ",
    )  # fmt: skip
    run = dataclasses.replace(run, on_block=bar.update)
    bound = _neighbour_index(run) if todo else None
    if sweeps(run) and todo:

        def finish(point: CurvePoint) -> CurvePoint:
            return point if bound is None else _with_bound(point, bound(point.sigma), run.variance)

        done.update(grid_points(run, todo, functools.partial(_estimate_point, run), finish))
    points = []
    for sigma in sigmas:
        if sigma in done:
            points.append(done[sigma])
            continue
        bar.set_postfix(sigma=f"{sigma:.4g}")
        point = _estimate_point(run, sigma)
        if bound is not None:
            point = _with_bound(point, bound(sigma), run.variance)
        points.append(point)
        run.save(point)
    bar.close()
    return points


def _neighbour_index(run: EstimateRun) -> NearestPointBound | None:
    """Where the estimator or the tilted draws need neighbours: the index of the sources'
    k nearest points, attached to the pools, and the nearest-point bound it gives; else None.
    The first k columns are the same for any k (``nearest_neighbours``)."""
    k = max(run.estimator.neighbours_needed, TILT_NEIGHBOURS * (run.draws == "tilted"))
    if k == 0:
        return None
    # the bound's distances: from the data in memory; of streamed data, by reading rows (only
    # those the draws' index lists: reads as many as the tilted draws make)
    streamed = isinstance(run.plan.data, ChunkedDataset)
    k_bound = k if streamed else max(k, BOUND_NEIGHBOURS)
    index_pools = run.pools(run.pools.index_dtype(run.precision))
    tables = neighbour_tables(run.plan, index_pools, k_bound, run.tile_bytes)
    run.pools.attach(tables)
    return NearestPointBound.from_index(run.plan, index_pools, tables)


def _with_bound(point: CurvePoint, bound: float, variance: float) -> CurvePoint:
    """``point`` with ``upper_bound`` where the bound is below the data variance (J* ≤ Var
    always: the mean as denoiser) and ``memorised`` where it is at most MEMORISED_SHARE of it."""
    if not bound < variance:
        return point
    return dataclasses.replace(
        point, upper_bound=bound, memorised=bound <= MEMORISED_SHARE * variance
    )


def _estimate_point(run: EstimateRun, sigma: float) -> CurvePoint:
    """J*(σ) from the per-sample values of both forms (``EstimateRun.point``); with adaptive
    sizes, sizes from ``adaptive_values``."""
    dtype = run.pools.dtype_at(run.precision, sigma)
    t0 = time.perf_counter()
    used: tuple[int, Estimator] | None = None
    if run.adaptive is None:
        samples, dtype = run.values(sigma, run.estimator, run.plan.outer, dtype)
    else:
        values = functools.partial(run.values, sigma)
        samples, dtype, used = adaptive_values(
            values, run.plan, run.estimator, run.form, dtype, *run.adaptive
        )
    return run.point(sigma, samples, dtype, time.perf_counter() - t0, used)


def _plan(
    x: torch.Tensor | ChunkedDataset,
    labels: torch.Tensor | None,
    m: int,
    seed: int,
    conditional: bool,
    estimator: Estimator,
    std: torch.Tensor | None = None,
) -> OuterPlan:
    """The plan of M draws (of Gaussian items N(x_i, diag std_i²) with ``std``), each of its
    groups checked as the estimator's pool."""
    plan = OuterPlan.build(x, labels, m, seed, conditional, std)
    for members, _ in plan.groups:
        estimator.check(members.numel())
    return plan


def _resume(
    run: EstimateRun,
    path: str | os.PathLike[str],
    options: dict,
    sigmas: Sequence[float],
    restart: bool,
) -> Checkpoint:
    """The checkpoint at ``path`` for these options and the run's draws, the same on every
    process (rank 0 writes; logging at INFO which of ``sigmas`` it holds, if the run shows
    progress); refused where its points do not read as points."""
    with run.group.together():
        saved = _open(path, [run.plan.fingerprint, run.plan.conditional], options, restart)
        found = [s for s in sigmas if _find(saved, s) is not None]
        if run.progress and found:
            listed = ", ".join(f"{s:.4g}" for s in found)
            log.info("resuming: %d of %d σ already computed in %s (σ = %s)", len(found),
                     len(sigmas), saved.path, listed)  # fmt: skip
    saved.writes = run.group.main
    run.group.check_same("checkpoints", str(sorted(saved.done)))
    return saved


def _open(path: str | os.PathLike[str], draws: list, options: dict, restart: bool) -> Checkpoint:
    """The checkpoint at ``path`` under the key of everything a point's numbers depend on: the
    draws (data fingerprint, conditional; M and seed are options), the estimator, the form, the
    precision, process and target."""
    key = checkpoint_key([CHECKPOINT_FORMAT, draws, options])
    saved = Checkpoint.open(path, key, "an estimate", restart)
    try:
        for name, p in saved.done.items():
            if not name.startswith(BLOCK_UNIT):  # a sweep's finished blocks: sweep._Blocks
                CurvePoint.from_json(p)
    except (UserError, AttributeError, KeyError, TypeError, ValueError):
        raise ParameterError(
            "restart", None, f"{path} is not a checkpoint of an estimate; delete it, or set "
            "{option} to overwrite it",
        ) from None  # fmt: skip
    return saved


def _unit_name(sigma: float) -> str:
    """A point's unit in the checkpoint."""
    return f"sigma={sigma!r}"


def _find(saved: Checkpoint | None, sigma: float) -> CurvePoint | None:
    """The saved point at ``sigma`` (``same_sigma``), if any."""
    if saved is None:
        return None
    points = (CurvePoint.from_json(p) for n, p in saved.done.items() if n.startswith("sigma="))
    return next((p for p in points if same_sigma(p.sigma, sigma)), None)

"""The optimal-loss curve of a dataset: J*(σ) over a σ grid with standard errors
(docs/method.md §2–3).

    J*(σ) = E‖x0 − μ(x0 + σε)‖²/D = (A − E‖μ‖²)/D,   μ(x) = E[x0 | x_t = x]

estimated from M outer draws shared across the grid; μ from one of the estimators. With a
``checkpoint`` file every finished σ is saved, and a rerun with the same data and options
resumes from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lossfloor.data import Dataset, load_dataset, mean_and_variance
from lossfloor.data.chunked import ChunkedDataset
from lossfloor.device import resolve_device
from lossfloor.diffusion import Process, Target
from lossfloor.distributed import Group, current
from lossfloor.errors import ParameterError, UserError
from lossfloor.io import read_json, write_json
from lossfloor.optimal.bound import BOUND_NEIGHBOURS, MEMORISED_SHARE, NearestPointBound
from lossfloor.optimal.curve import Curve, CurvePoint
from lossfloor.optimal.estimators import Estimator, EstimatorSpec, PerSample, as_estimator
from lossfloor.optimal.gram import Gram
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.neighbours import neighbour_tables
from lossfloor.optimal.outer import (
    MIN_EFFECTIVE_DRAWS,
    OUTER_BLOCK,
    TILT_NEIGHBOURS,
    Draws,
    Form,
    Moments,
    OuterPlan,
    Precision,
    base_dtype,
    block_noise,
    check_outer,
    check_sigmas,
    join_samples,
    outer_for,
    per_sample_values,
    resolve_draws,
    resolve_form,
)
from lossfloor.optimal.pool_cache import PoolsByDtype
from lossfloor.optimal.shard import check_sharded
from lossfloor.progress import progress_bar
from lossfloor.schedules import NoiseSchedule
from lossfloor.seeding import Stream, generator_for
from lossfloor.sigmas import same_sigma

log = logging.getLogger(__name__)

#: Bumped when a checkpoint's points would no longer match what the code computes.
CHECKPOINT_FORMAT = "lossfloor-estimate-checkpoint/2"


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
    ``load_dataset``'s). ``estimator``: an Estimator, a name or a config (``as_estimator``:
    a name's defaults depend on N, so a name is resolved here, once N is known).

    ``outer`` M defaults to N (every point once). ``draws``: ``tilted`` (importance-sampled
    noise toward each source's nearest neighbours, ``outer.tilted_noise``: right below σ*, where
    J* rests on rare draws), ``plain`` (ε ~ N(0, I), as in the paper) or ``auto`` (tilted for
    full and stratified, plain for snis/dol/cdol: ``outer.resolve_draws``).
    ``process``/``target`` (lossfloor.diffusion) add each σ's process time t and the value in
    the target's units; ``schedule`` the total E_{σ~p}[w(σ)·J*(σ)]. With ``checkpoint`` (a
    file path), each finished σ is saved there and a rerun with the same data and options
    computes only the missing σ; the file is removed once the curve is complete. A checkpoint
    of other data or options is refused unless ``restart`` (which discards it).

    ``target_rse`` (adaptive sizes, ``_adaptive_values``): per σ, the number of draws (and the
    stratified estimator's far sample) for this relative standard error, from a pilot of the
    first ``outer`` draws (default ADAPTIVE_PILOT; whole blocks of OUTER_BLOCK) of a plan of
    ``max_outer`` (default ADAPTIVE_CAP × the pilot); each point records what it used.
    ``device``: ``"auto"`` is cuda when available, else cpu (``lossfloor.device``).
    """
    device = resolve_device(device)
    group = current(device)
    with group.together():
        if isinstance(data, str):
            data = load_dataset(data)
        x, labels, described = _unpack(data, labels, conditional, group)
        _check_grid(x, sigmas, outer)
        n = len(x)
        estimator = as_estimator(estimator, n)
        adaptive = _adaptive_sizes(target_rse, max_outer, outer)
        m = adaptive[2] if adaptive is not None else n if outer is None else outer
        plan = OuterPlan.build(x, labels, m, seed, conditional)
        for members, _ in plan.groups:
            estimator.check(members.numel())
        base_dtype(precision)  # an unknown policy fails before any work
        draws = resolve_draws(draws, estimator)
        check_sharded(estimator, conditional, group, streamed=isinstance(x, ChunkedDataset))
    options = {
        "estimator": estimator.to_config(),
        "outer": plan.outer,
        "seed": seed,
        "draws": draws,
        "form": resolve_form(form, estimator),
        "precision": precision,
        "process": None if process is None else process.to_config(),
        "target": None if target is None else target.to_config(),
    }
    if adaptive is not None:  # only then: the checkpoint keys of other runs stay as they were
        options.update(target_rse=adaptive[0], pilot=adaptive[1])
    if group.world > 1:  # the same data and options on every process, before any work
        group.check_same("data", plan.fingerprint, f"sha256 {plan.fingerprint[:12]}…")
        group.check_same("options", json.dumps([options, list(sigmas)], default=str))
    with group.together():
        saved = (
            None
            if checkpoint is None
            else _resume(checkpoint, options, plan, sigmas, restart, progress and group.main)
        )
    if saved is not None:
        saved.writes = group.main
        group.check_same("checkpoints", str(sorted(saved.points)))
    variance = x.summary.variance if isinstance(x, ChunkedDataset) else mean_and_variance(x)[1]
    points = _estimate_points(
        plan, estimator, sigmas, options["form"], precision, torch.device(device), tile_bytes,
        process, target, saved, progress and group.main, draws, group,
        None if adaptive is None else adaptive[:2], variance,
    )  # fmt: skip
    curve = Curve(points=tuple(points), data_variance=variance, dataset=described, **options)
    if schedule is not None:
        curve = dataclasses.replace(curve, total=curve.total_under(schedule))
    if saved is not None:
        saved.remove()
    return curve


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


def _estimate_points(
    plan: OuterPlan,
    estimator: Estimator,
    sigmas: Sequence[float],
    form: str,
    precision: str,
    device: torch.device,
    tile_bytes: int,
    process: Process | None,
    target: Target | None,
    saved: Checkpoint | None,
    progress: bool,
    draws: str,
    group: Group,
    adaptive: tuple[float, int] | None = None,
    variance: float | None = None,
) -> list[CurvePoint]:
    """One point per σ of ``sigmas``: from ``saved`` where it has one, else computed (and
    added to ``saved``); on K > 1 processes, each on its shard of the data. Where the draws
    use a neighbour index that lists every point, each computed point also gets the bound J* ≤
    ``upper_bound`` (``_with_bound``; the index then holds at least BOUND_NEIGHBOURS, but for
    streamed data; a grid in one sweep has plain draws, no index)."""
    done = {s: p for s in sigmas if saved is not None and (p := saved.find(s)) is not None}
    todo = [s for s in sigmas if s not in done]
    bar = progress_bar(
        total=None if adaptive else len(todo) * plan.blocks, enabled=progress, unit="block",
        leave=False,
        desc=f"J*(σ) in blocks of the {plan.outer} draws ({plan.blocks} per σ)"
        if adaptive is None
        else f"J*(σ) in blocks of up to {plan.outer} draws per σ",
    )  # fmt: skip
    pools = PoolsByDtype(plan, device, group)
    k = max(estimator.neighbours_needed, TILT_NEIGHBOURS * (draws == "tilted"))
    bound = None
    if todo and k > 0:  # the first k columns are the same for any k (``nearest_neighbours``)
        # the bound's distances: from the data in memory; of streamed data, by reading rows
        # (only those the draws' index lists: reads as many as the tilted draws make)
        streamed = isinstance(plan.data, ChunkedDataset)
        k_bound = k if streamed else max(k, BOUND_NEIGHBOURS)
        index_pools = pools(pools.index_dtype(precision))
        tables = neighbour_tables(plan, index_pools, k_bound, tile_bytes)
        pools.attach(tables)
        bound = NearestPointBound.from_index(plan, index_pools, tables)
    if _sweeps(plan, estimator, draws, group, adaptive) and todo:
        done.update(_grid_points(plan, estimator, todo, form, precision, pools, bar.update,
                                 process, target, saved, group))  # fmt: skip
    points = []
    for sigma in sigmas:
        if sigma in done:
            points.append(done[sigma])
            continue
        bar.set_postfix(sigma=f"{sigma:.4g}")
        point = _estimate_point(
            plan, estimator, sigma, form, precision, pools, tile_bytes, process, target,
            bar.update, draws, adaptive,
        )  # fmt: skip
        if bound is not None and variance is not None:
            point = _with_bound(point, bound(sigma), variance)
        points.append(point)
        if saved is not None:
            with group.together():  # rank 0 writes
                saved.add(point)
    bar.close()
    return points


def _with_bound(point: CurvePoint, bound: float, variance: float) -> CurvePoint:
    """``point`` with ``upper_bound`` where the bound is below the data variance (J* ≤ Var
    always: the mean as denoiser) and ``memorised`` where it is at most MEMORISED_SHARE of it."""
    if not bound < variance:
        return point
    return dataclasses.replace(
        point, upper_bound=bound, memorised=bound <= MEMORISED_SHARE * variance
    )


def _sweeps(
    plan: OuterPlan,
    estimator: Estimator,
    draws: str,
    group: Group,
    adaptive: tuple[float, int] | None,
) -> bool:
    """Whether the whole grid is one sweep (``Gram.grid_values``): an estimator that sweeps
    grids (``capabilities.sweeps_grid``: gram) on plain draws, one pool held in memory by one
    process, fixed sizes; else it runs σ by σ like the others."""
    return (
        estimator.capabilities.sweeps_grid
        and draws == "plain"
        and adaptive is None
        and group.world == 1
        and len(plan.groups) == 1
        and not isinstance(plan.data, ChunkedDataset)
    )


def _grid_points(
    plan: OuterPlan,
    estimator: Gram,
    sigmas: Sequence[float],
    form: str,
    precision: str,
    pools: PoolsByDtype,
    on_block: Callable[[], None],
    process: Process | None,
    target: Target | None,
    saved: Checkpoint | None,
    group: Group,
) -> dict[float, CurvePoint]:
    """Every σ of ``sigmas`` from one sweep over the draws per dtype (the σ that overflow
    float32 under ``auto`` again in float64); each point's ``seconds`` is its dtype's sweep
    time over its σ."""
    by_dtype: dict[torch.dtype, list[float]] = {}
    for sigma in sigmas:
        by_dtype.setdefault(pools.dtype_at(precision, sigma), []).append(sigma)
    points: dict[float, CurvePoint] = {}
    while by_dtype:
        dtype, group_sigmas = by_dtype.popitem()
        t0 = time.perf_counter()
        samples = _grid_values(plan, estimator, group_sigmas, dtype, pools, on_block)
        seconds = (time.perf_counter() - t0) / len(group_sigmas)
        for sigma, s in zip(group_sigmas, samples, strict=True):
            if not bool(s.closed.isfinite().all() and s.direct.isfinite().all()):
                if precision == "auto" and dtype != torch.float64:
                    by_dtype.setdefault(torch.float64, []).append(sigma)
                    continue
                raise ParameterError(
                    "sigmas", sigma, f"J* overflows {str(dtype).removeprefix('torch.')} at "
                    "this σ for this data's scale",
                )  # fmt: skip
            point = _make_point(sigma, s, dtype, form, seconds, process, target, "plain")
            points[sigma] = point
            if saved is not None:
                with group.together():
                    saved.add(point)
    return points


def _grid_values(
    plan: OuterPlan,
    estimator: Gram,
    sigmas: Sequence[float],
    dtype: torch.dtype,
    pools: PoolsByDtype,
    on_block: Callable[[], None],
) -> list[PerSample]:
    """Per-sample values at every σ of ``sigmas`` on the plan's plain draws, block by block
    (the draws and inner streams of ``per_sample_values``: equal to gram σ by σ)."""
    pool = pools(dtype)[0]
    m, dim = plan.outer, pool.dim
    closed = [torch.empty(m, dtype=torch.float64) for _ in sigmas]
    direct = [torch.empty(m, dtype=torch.float64) for _ in sigmas]
    for j in range(plan.blocks):
        lo, hi = j * OUTER_BLOCK, min(m, (j + 1) * OUTER_BLOCK)
        noise = block_noise(plan.seed, j, hi - lo, dim).to(device=pools.device, dtype=dtype)
        gens = [generator_for(plan.seed, Stream.INNER, j) for _ in sigmas]
        src = plan.sources[lo:hi].to(pools.device)
        for i, s in enumerate(estimator.grid_values(pool, src, noise, sigmas, gens)):
            closed[i][lo:hi], direct[i][lo:hi] = s.closed.cpu(), s.direct.cpu()
            on_block()
    return [PerSample(closed=c, direct=d) for c, d in zip(closed, direct, strict=True)]


def _estimate_point(
    plan: OuterPlan,
    estimator: Estimator,
    sigma: float,
    form: str,
    precision: str,
    pools: PoolsByDtype,
    tile_bytes: int,
    process: Process | None,
    target: Target | None,
    on_block: Callable[[], None],
    draws: str,
    adaptive: tuple[float, int] | None = None,
) -> CurvePoint:
    """J*(σ) from the per-sample values of both forms (``Moments``), with the process time t
    and the value in the target's units (J*·loss factor) where a process and target are given;
    ``adaptive`` = (target rse, pilot draws): sizes from ``_adaptive_values``."""
    dtype = pools.dtype_at(precision, sigma)
    t0 = time.perf_counter()
    run = _Run(plan, sigma, precision, pools, tile_bytes, on_block, draws)
    used: tuple[int, Estimator] | None = None
    if adaptive is None:
        samples, dtype = run(estimator, plan.outer, dtype)
    else:
        samples, dtype, used = _adaptive_values(run, estimator, form, dtype, *adaptive)
    seconds = time.perf_counter() - t0
    return _make_point(sigma, samples, dtype, form, seconds, process, target, draws, used)


def _make_point(
    sigma: float,
    samples: PerSample,
    dtype: torch.dtype,
    form: str,
    seconds: float,
    process: Process | None,
    target: Target | None,
    draws: str,
    used: tuple[int, Estimator] | None = None,
) -> CurvePoint:
    """The point at σ from its per-sample values (``Moments``); ``used`` = (M, estimator)
    where adaptive sizes chose them."""
    mom = Moments.from_samples(samples)
    value, se = mom.pick(form)
    value = max(value, 0.0)  # J* is an expected squared error: a negative mean is noise
    sizes = {}
    if used is not None:
        sizes = {
            "outer": used[0],
            "inner": used[1].inner if used[1].capabilities.adapts_inner else None,
            "rse": se / value if value > 0 else None,
        }
    # tilted draws bound the closed form's rounding; not finite where σ² underflows the logits
    rounding = samples.closed_error if draws == "tilted" else None
    rounding = rounding if rounding is not None and math.isfinite(rounding) else None
    in_target = None
    if process is not None and target is not None:
        in_target = in_target_units(value, sigma, process, target)
    return CurvePoint(
        sigma=sigma,
        t=float(process.t_of_sigma_ve(sigma)) if process is not None else sigma,
        optimal_loss=value,
        stderr=se,
        optimal_loss_target=in_target,
        seconds=seconds,
        closed=mom.closed,
        closed_stderr=mom.closed_stderr,
        direct=mom.direct,
        direct_stderr=mom.direct_stderr,
        combined_weight_closed=mom.weight_closed,
        closed_rounding=rounding,
        dtype=str(dtype).removeprefix("torch."),
        ess=mom.ess,
        resolved=bool(mom.ess >= MIN_EFFECTIVE_DRAWS),  # ESS 0: no draw carries a value
        **sizes,
    )


def in_target_units(value: float, sigma: float, process: Process, target: Target) -> float:
    """A loss per element in x0 units at σ in the target's units: value·(its loss factor at
    the process time of σ)."""
    return value * float(target.loss_factor(process.t_of_sigma_ve(sigma), process))


#: Adaptive sizes: the default pilot (draws), the default plan (× the pilot), and the share of
#: the target error the stratified estimator's far-sample bias may take.
ADAPTIVE_PILOT = 4 * OUTER_BLOCK
ADAPTIVE_CAP = 64
ADAPTIVE_BIAS_SHARE = 0.5


def _adaptive_sizes(
    target_rse: float | None, max_outer: int | None, outer: int | None
) -> tuple[float, int, int] | None:
    """(target, pilot, plan size) of adaptive sizes, checked; None without a target. The pilot
    is ``outer`` (default ADAPTIVE_PILOT) rounded up to whole blocks of OUTER_BLOCK."""
    if target_rse is None:
        if max_outer is not None:
            raise ParameterError("max_outer", max_outer, "applies to adaptive sizes: give a target")
        return None
    if not (isinstance(target_rse, int | float) and 0 < target_rse < 1):
        raise ParameterError("target_rse", target_rse, "a relative standard error in (0, 1)")
    pilot = ADAPTIVE_PILOT if outer is None else outer
    check_outer(pilot)
    pilot = math.ceil(pilot / OUTER_BLOCK) * OUTER_BLOCK
    cap = ADAPTIVE_CAP * pilot if max_outer is None else max_outer
    check_outer(cap)
    if cap < pilot:
        raise ParameterError(
            "max_outer", cap, f"below the pilot's {pilot} draws (whole blocks of {OUTER_BLOCK})"
        )
    return float(target_rse), min(pilot, cap), cap


@dataclass
class _Run:
    """The per-sample values of an estimator on the first m draws of a plan at one σ, in a
    dtype (switching to float64 under ``auto`` where float32 overflows)."""

    plan: OuterPlan
    sigma: float
    precision: str
    pools: PoolsByDtype
    tile_bytes: int
    on_block: Callable[[], None]
    draws: str

    def __call__(
        self, estimator: Estimator, m: int, dtype: torch.dtype, first_block: int = 0
    ) -> tuple[PerSample, torch.dtype]:
        plan = self.plan.prefix(m)
        args = (plan, estimator, self.sigma, self.pools, self.tile_bytes, self.on_block,
                self.draws, first_block)  # fmt: skip
        samples = _finite_values(*args[:3], dtype, *args[3:])
        if samples is None and self.precision == "auto" and dtype != torch.float64:
            dtype = torch.float64  # float32 overflowed: σ is far from the data's scale
            samples = _finite_values(*args[:3], dtype, *args[3:])
        if samples is None:
            hint = "" if dtype == torch.float64 else "; choose precision float64"
            raise ParameterError(
                "sigmas", self.sigma, f"J* overflows {str(dtype).removeprefix('torch.')} at "
                f"this σ for this data's scale{hint}",
            )  # fmt: skip
        return samples, dtype


def _adaptive_values(
    run: _Run, estimator: Estimator, form: str, dtype: torch.dtype, target: float, pilot: int
) -> tuple[PerSample, torch.dtype, tuple[int, Estimator]]:
    """Per-sample values at one σ with sizes chosen for a relative standard error ``target``:

    1. a pilot on the first ``pilot`` draws gives J₀ ± s₀;
    2. stratified: the far sample L from the ratio-estimator bias b/L (O(1/L), the
       ``Stratified`` docstring): the pilot at L' = min(2L, N) on the same draws gives
       b = (J_L − J_L')/(1/L − 1/L'), and L grows to |b|/(share·target·J_L') so the bias b/L
       is at most share = ADAPTIVE_BIAS_SHARE of the target (the pilot is rerun at the chosen
       L if it is neither L nor L');
    3. M = M₀·(s₀/(target·J₀))² (s ∝ 1/√M: ``outer.outer_for``), in whole blocks, within
       [pilot, the plan's M]; the pilot's draws are the first M's (they are not drawn again).

    The reported stderr is that of the M draws, so the achieved relative error is measured, not
    assumed; it misses the target where M reaches the plan's size."""
    first, dtype = run(estimator, pilot, dtype)
    value, se = Moments.from_samples(first).pick(form)
    est = estimator
    n = min(members.numel() for members, _ in run.plan.groups)
    if estimator.capabilities.adapts_inner and estimator.inner < n:
        big = estimator.inner
        wider = dataclasses.replace(estimator, inner=min(n, 2 * big))
        second, dtype = run(wider, pilot, dtype)
        value2, se2 = Moments.from_samples(second).pick(form)
        slope = (value - value2) / (1 / big - 1 / wider.inner)  # b in J_L = J + b/L
        want = abs(slope) / (ADAPTIVE_BIAS_SHARE * target * value2) if value2 > 0 else n
        if want > big:
            size = min(n, math.ceil(want))
            if size <= wider.inner:
                est, first, value, se = wider, second, value2, se2
            else:
                est = dataclasses.replace(estimator, inner=size)
                first, dtype = run(est, pilot, dtype)
                value, se = Moments.from_samples(first).pick(form)
    need = outer_for(pilot, value, se, target)
    blocks = math.ceil(need / OUTER_BLOCK) if math.isfinite(need) else run.plan.blocks
    m = min(run.plan.outer, max(pilot, blocks * OUTER_BLOCK))
    if m > pilot:
        rest, wider_dtype = run(est, m, dtype, pilot // OUTER_BLOCK)
        if wider_dtype != dtype:  # the rest overflowed float32: all of it in float64
            first, dtype = run(est, m, wider_dtype)
        else:
            first = join_samples(first, rest)
    return first, dtype, (m, est)


def _finite_values(
    plan: OuterPlan,
    estimator: Estimator,
    sigma: float,
    dtype: torch.dtype,
    pools: PoolsByDtype,
    tile_bytes: int,
    on_block: Callable[[], None],
    draws: str,
    first_block: int = 0,
) -> PerSample | None:
    """``per_sample_values`` at σ in ``dtype``, or None where they overflow it."""
    try:
        s = per_sample_values(
            plan, estimator, sigma, dtype, pools.device, pools(dtype), tile_bytes, on_block, draws,
            pools.tilts, first_block,
        )  # fmt: skip
    except RuntimeError as exc:  # torch: "value cannot be converted to type float without overflow"
        if "overflow" not in str(exc):
            raise
        return None
    return s if bool(s.closed.isfinite().all() and s.direct.isfinite().all()) else None


def _resume(
    path: str | os.PathLike[str],
    options: dict,
    plan: OuterPlan,
    sigmas: Sequence[float],
    restart: bool,
    announce: bool,
) -> Checkpoint:
    """The checkpoint at ``path`` for these options and draws (logging at INFO which of
    ``sigmas`` it holds, if ``announce``)."""
    saved = Checkpoint.open(path, _checkpoint_key(options, plan), restart)
    found = [s for s in sigmas if saved.find(s) is not None]
    if announce and found:
        listed = ", ".join(f"{s:.4g}" for s in found)
        log.info(
            "resuming: %d of %d σ already computed in %s (σ = %s)",
            len(found),
            len(sigmas),
            saved.path,
            listed,
        )
    return saved


def _checkpoint_key(options: dict, plan: OuterPlan) -> str:
    """sha256 of everything a point's numbers depend on: the draws (data fingerprint, M, seed,
    conditional), the estimator, the form, the precision, process and target."""
    draws = [plan.fingerprint, plan.conditional]
    text = json.dumps([CHECKPOINT_FORMAT, draws, options], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Checkpoint:
    """The finished points of an estimate, saved one σ at a time to ``path`` (atomically) under
    the ``key`` of the data and options that produced them. A file of other options, or one
    that is not a checkpoint, is refused unless ``restart`` (then it is overwritten by the
    first new point)."""

    path: Path
    key: str
    points: dict[float, CurvePoint]
    writes: bool = True  # False on the processes other than rank 0: they only read

    @classmethod
    def open(cls, path: str | os.PathLike[str], key: str, restart: bool = False) -> Checkpoint:
        path = Path(path)
        points: dict[float, CurvePoint] = {}
        if path.is_file() and not restart:
            try:
                saved = read_json(path)
                if not isinstance(saved, dict) or not isinstance(saved.get("points"), list):
                    raise ValueError
                loaded = [CurvePoint.from_json(p) for p in saved["points"]]
            except (UserError, AttributeError, KeyError, TypeError, ValueError):
                raise ParameterError(
                    "restart", None, f"{path} is not a checkpoint of an estimate; delete it, "
                    "or set {option} to overwrite it",
                ) from None  # fmt: skip
            if saved.get("key") != key:
                raise ParameterError(
                    "restart", None, f"{path} holds {len(loaded)} σ of an estimate with other "
                    "data or options; rerun with those, or set {option} to discard them",
                )  # fmt: skip
            points = {p.sigma: p for p in loaded}
        return cls(path=path, key=key, points=points)

    def find(self, sigma: float) -> CurvePoint | None:
        """The saved point at ``sigma`` (``same_sigma``), if any."""
        return next((p for s, p in self.points.items() if same_sigma(s, sigma)), None)

    def add(self, point: CurvePoint) -> None:
        """Record ``point`` and rewrite the file (if this process writes)."""
        self.points[point.sigma] = point
        if self.writes:
            points = [p.to_json() for p in self.points.values()]
            write_json(self.path, {"key": self.key, "points": points})

    def remove(self) -> None:
        """Delete the file (the curve is complete; if this process writes)."""
        if self.writes:
            self.path.unlink(missing_ok=True)

"""The generalising floor: is J*(σ) of a training set converged in N, and what bounds the
population's optimal loss from above (docs/floor.md has the proofs).

J*_train(σ) is the loss of the denoiser that memorises the training set. Two facts bracket the
population value J*_pop(σ) = E‖x0 − E[x0 | x]‖²/D (x0 from the data distribution):

- lower: E[J*_train(σ)] ≤ J*_pop(σ) (the empirical minimum is at most the empirical risk of the
  population-optimal denoiser, whose expectation is J*_pop), and E[J*] of a random n-subset
  rises toward J*_pop as n grows;
- upper: any denoiser fixed without the held-out data has expected held-out loss ≥ J*_pop: the
  training set's optimal denoiser μ_train and its smoothed version D_b (the posterior mean under
  a Gaussian kernel density estimate of the training set, bandwidth b):

      D_b(x, σ) = (σ²·μ_s(x) + b²·x)/(σ² + b²),   s = √(σ² + b²),

  with μ_s the optimal denoiser of the training set at noise level s (the same kernel).

``heldout_losses`` computes both held-out losses; ``floor`` adds J* on nested random subsets
(n = N/2^k … N) and a per-σ verdict (``FloorPoint``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import torch

from lossfloor.data import Dataset, mean_and_variance
from lossfloor.device import resolve_device
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.blocks import outer_blocks
from lossfloor.optimal.checkpoint import Checkpoint, checkpoint_key
from lossfloor.optimal.curve import Curve
from lossfloor.optimal.draws import Draws, OuterPlan, check_outer, check_seed, stratified_sources
from lossfloor.optimal.estimate import estimate_curve
from lossfloor.optimal.estimators import ESTIMATORS
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.moments import mean_and_stderr
from lossfloor.optimal.pool_cache import PoolsByDtype
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.precision import (
    Overflow,
    Precision,
    base_dtype,
    check_sigmas,
    choose_dtype,
    finite,
)
from lossfloor.progress import progress_bar
from lossfloor.results import Result
from lossfloor.seeding import Stream, generator_for
from lossfloor.sigmas import same_sigma

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from lossfloor.diagnosis import Diagnosis, GapPoint

log = logging.getLogger(__name__)
Tensor = torch.Tensor

#: Candidate bandwidths of ``bandwidth="auto"``, in units of the data's per-element std.
AUTO_BANDWIDTHS = tuple(float(b) for b in np.geomspace(0.01, 1.0, 9))

#: Leave-one-out draws that score each candidate bandwidth of ``bandwidth="auto"`` (at most N).
VALIDATION_DRAWS = 512

#: J*(N) below this fraction of the data variance is memorisation, not a converged floor.
MEMORISED = 1e-3

#: Converged: the change of J* over each of the last two doublings of n, plus 2 standard
#: errors, within this fraction of J*(N) (the data must rule out a larger change, not merely
#: fail to show one); about what 3 repeats of M = 2,048 resolve where J* ≥ 0.1·variance.
CONVERGED_DRIFT = 0.05

#: Extrapolation: the rise per doubling of n shrinks by a ratio r ≤ R_MAX (a geometric series).
R_MAX = 0.95

#: The tag of the floor's checkpoint key (``Units``), and of floor files written before the
#: shared result header (``Floor.LEGACY_FORMAT``).
FORMAT = "lossfloor-floor/1"

#: The columns of ``Floor.to_csv``: a point's key and its unit.
CSV_COLUMNS = {
    "sigma": "VE sigma",
    "lower": "x0 units per element",
    "lower_stderr": "x0 units per element",
    "upper": "x0 units per element",
    "upper_stderr": "x0 units per element",
    "upper_source": "",
    "converged": "",
    "verdict": "",
    "rise": "x0 units per element",
    "rise_stderr": "x0 units per element",
    "extrapolated": "x0 units per element",
    "extrapolated_stderr": "x0 units per element",
    "crossing": "",
    "heldout_loss": "x0 units per element",
    "heldout_stderr": "x0 units per element",
    "smoothed_loss": "x0 units per element",
    "smoothed_stderr": "x0 units per element",
    "bandwidth": "x0 units",
}


def smoothed_posterior_mean(
    pool: Pool,
    queries: Tensor,
    sigma: float,
    bandwidth: float,
    *,
    exclude: Tensor | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> Tensor:
    """D_b(q) = (σ²·μ_s(q) + b²·q)/(σ² + b²), s = √(σ² + b²): E[x0 | q] under the prior
    (1/N)·Σ_n 𝒩(x0; x_n, b²I) (b = 0 is μ_σ). ``exclude`` (B pool indices) leaves each query's
    own point out of the sum (leave-one-out validation)."""
    s = math.sqrt(sigma * sigma + bandwidth * bandwidth)
    mu = pool.merge(pool.accumulate(queries, s, exclude=exclude, tile_bytes=tile_bytes)).mean()
    v, b2 = sigma * sigma, bandwidth * bandwidth
    return (v * mu + b2 * queries) / (v + b2)


@dataclass(frozen=True, kw_only=True)
class HeldoutPoint:
    """Held-out losses at σ (per element, x0 units): of the training set's optimal denoiser
    (``heldout_loss`` = E‖x0_h − μ_train(x0_h + σε)‖²/D) and of the smoothed one at bandwidth b
    (None without a bandwidth). Both are upper bounds on J*_pop(σ) in expectation."""

    sigma: float
    heldout_loss: float
    heldout_stderr: float
    smoothed_loss: float | None = None
    smoothed_stderr: float | None = None
    bandwidth: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_heldout(train: Tensor, heldout: Tensor) -> None:
    """Held-out data must be items of the training data's shape."""
    if heldout.shape[0] < 1:
        raise ParameterError("heldout", 0, "the held-out set is empty")
    if tuple(heldout.shape[1:]) != tuple(train.shape[1:]):
        raise ParameterError(
            "heldout",
            "x".join(map(str, heldout.shape[1:])),
            f"items differ in shape from the training data's {'x'.join(map(str, train.shape[1:]))}",
        )


def check_bandwidth(bandwidth: float | str | None) -> None:
    """None, ``"auto"`` or a finite b ≥ 0."""
    if bandwidth is None or bandwidth == "auto":
        return
    if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth >= 0):
        raise ParameterError("bandwidth", bandwidth, "expected auto or a finite number ≥ 0")


class _Pools:
    """The training pool in each dtype a precision policy asks for (``outer.PoolsByDtype`` of
    the training set as one group), and the dtype at σ (the fp32 error bound over training and
    held-out norms)."""

    def __init__(self, train: Tensor, heldout_max_sq: float, device: torch.device) -> None:
        self.train, self.device, self.heldout_max_sq = train, device, heldout_max_sq
        # the plan's draws play no part: its one group of every point is what the pools are of
        plan = OuterPlan.build(train, None, max(2, train.shape[0]), 0, False)
        self.by_dtype = PoolsByDtype(plan, device)

    def __call__(self, dtype: torch.dtype) -> Pool:
        return self.by_dtype(dtype)[0]

    def dtype_at(self, precision: str, sigma: float) -> torch.dtype:
        pool = self(base_dtype(precision))
        bound = dataclasses.replace(pool, max_sq=max(pool.max_sq, self.heldout_max_sq))
        return choose_dtype(precision, [bound], sigma)


def _centred(x: Tensor, pool: Pool) -> Tensor:
    """x (n×...) flattened, in float64, centred by the training pool's mean."""
    return pool.centre(x)


def _losses(
    pools: _Pools,
    x0: Tensor,
    sources: Tensor,
    sigma: float,
    bandwidths: Sequence[float],
    *,
    seed: int,
    stream: Stream,
    precision: str,
    tile_bytes: int,
    exclude: bool = False,
) -> Tensor:
    """Per-sample ‖x0_s − D_b(x0_s + σε)‖²/D for each b (K×M, float64; b = 0 is μ_σ); ε from the
    stream (seed, stream, block) in the blocks of ``blocks.outer_blocks``: the estimate's ε when
    stream is ``Stream.OUTER_NOISE``. Values that overflow the dtype follow the
    ``precision.Overflow`` policy."""

    def compute(dtype: torch.dtype) -> Tensor:
        pool = pools(dtype)
        d = x0.shape[1]
        out = torch.empty(len(bandwidths), sources.numel(), dtype=torch.float64)
        for block in outer_blocks(sources, seed, d, stream=stream):
            src = block.sources.to(pool.device)
            x = x0[src].to(dtype)
            q = x + sigma * block.noise.to(device=pool.device, dtype=dtype)
            for k, b in enumerate(bandwidths):
                excl = src if exclude else None
                if b == 0 and not exclude:
                    mu = pool.merge(pool.accumulate(q, sigma, tile_bytes=tile_bytes)).mean()
                else:
                    mu = smoothed_posterior_mean(pool, q, sigma, b, exclude=excl,
                                                 tile_bytes=tile_bytes)  # fmt: skip
                out[k, block.lo : block.hi] = ((x - mu).double().pow(2).sum(dim=1) / d).cpu()
        return out

    dtype = pools.dtype_at(precision, sigma)
    return Overflow(precision).run(sigma, dtype, compute, finite)[0]


def choose_bandwidth(
    pools: _Pools,
    sigma: float,
    *,
    outer: int,
    seed: int,
    precision: str = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> float:
    """The b of AUTO_BANDWIDTHS (× the data's per-element std) with the least leave-one-out
    loss on the training set: M draws x0_n + σε scored by D_b over the other N − 1 points. The
    held-out set plays no part, so D_b stays a fixed denoiser for it (a valid upper bound)."""
    pool = pools(base_dtype(precision))
    scale = math.sqrt(pool.a / pool.dim)
    candidates = [b * scale for b in AUTO_BANDWIDTHS]
    sources = stratified_sources(pool.n, outer, seed)
    x0 = _centred(pools.train, pool)
    losses = _losses(
        pools,
        x0,
        sources,
        sigma,
        candidates,
        seed=seed,
        stream=Stream.FLOOR_VALIDATION,
        precision=precision,
        tile_bytes=tile_bytes,
        exclude=True,
    )
    return candidates[int(losses.mean(dim=1).argmin())]


class _Heldout:
    """The held-out draws of ``heldout_losses``, set up once (the training pools, the centred
    held-out points, the sources); ``point(σ)`` computes one σ."""

    def __init__(
        self,
        train: Tensor,
        heldout: Tensor,
        *,
        outer: int | None,
        seed: int,
        bandwidth: float | str | None,
        validation: int,
        precision: str,
        device: str | torch.device,
        tile_bytes: int,
    ) -> None:
        check_heldout(train, heldout)
        check_seed(seed)
        check_bandwidth(bandwidth)
        m = heldout.shape[0] if outer is None else outer
        check_outer(m)
        self.pools = _Pools(train, 0.0, resolve_device(device))
        self.x0 = _centred(heldout, self.pools(base_dtype(precision)))
        self.pools.heldout_max_sq = float(self.x0.pow(2).sum(dim=1).max())
        self.sources = stratified_sources(heldout.shape[0], m, seed)
        self.validation = max(2, min(validation, train.shape[0]))
        self.seed, self.bandwidth, self.precision = seed, bandwidth, precision
        self.tile_bytes = tile_bytes

    def point(self, sigma: float) -> HeldoutPoint:
        b = self.bandwidth
        if b == "auto":
            b = choose_bandwidth(
                self.pools,
                sigma,
                outer=self.validation,
                seed=self.seed,
                precision=self.precision,
                tile_bytes=self.tile_bytes,
            )
        bws = [0.0] if b is None else [0.0, float(b)]
        losses = _losses(
            self.pools,
            self.x0,
            self.sources,
            sigma,
            bws,
            seed=self.seed,
            stream=Stream.OUTER_NOISE,
            precision=self.precision,
            tile_bytes=self.tile_bytes,
        )
        value, se = mean_and_stderr(losses[0])
        smooth = (None, None) if b is None else mean_and_stderr(losses[1])
        return HeldoutPoint(
            sigma=float(sigma),
            heldout_loss=value,
            heldout_stderr=se,
            smoothed_loss=smooth[0],
            smoothed_stderr=smooth[1],
            bandwidth=None if b is None else float(b),
        )


def heldout_losses(
    train: Tensor,
    heldout: Tensor,
    sigmas: Sequence[float],
    *,
    outer: int | None = None,
    seed: int = 0,
    bandwidth: float | str | None = None,
    validation: int = VALIDATION_DRAWS,
    precision: str = "auto",
    device: str | torch.device = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
    progress: bool = False,
) -> list[HeldoutPoint]:
    """Per σ, the held-out losses of μ_train and (with ``bandwidth``: a number, or ``"auto"``
    = ``choose_bandwidth`` per σ on min(``validation``, N) draws) of D_b.

    M = ``outer`` (default: the held-out size) draws x0 from ``heldout`` (stratified as the
    estimate draws its sources) with the estimate's plain noise ε ~ N(0, I) (the loss of a
    fixed denoiser on unseen points needs no tilting), so with heldout = train and b = None
    ``heldout_loss`` equals the direct form of ``estimate_curve``'s full estimator with
    ``draws="plain"`` on the same draws, bitwise.
    """
    check_sigmas(list(sigmas))
    run = _Heldout(
        train,
        heldout,
        outer=outer,
        seed=seed,
        bandwidth=bandwidth,
        validation=validation,
        precision=precision,
        device=device,
        tile_bytes=tile_bytes,
    )
    return [
        run.point(s) for s in progress_bar(sigmas, desc="held-out σ", unit="σ", enabled=progress)
    ]


@dataclass(frozen=True, kw_only=True)
class SizePoint:
    """J* at σ of random n-subsets: the mean over ``repeats`` subsets and its standard error
    (the spread over subsets/√repeats combined with the draws' own errors)."""

    n: int
    optimal_loss: float
    stderr: float
    repeats: int


@dataclass(frozen=True, kw_only=True)
class FloorPoint:
    """The floor at σ: ``lower`` = J*_train(N) (± ``lower_stderr``), ``upper`` = the least
    held-out bound (± ``upper_stderr``, from ``upper_source``), the verdict (``size_verdict``:
    converged, memorised, rising or undecided) and the N-trend's extrapolation J*_∞ (± its
    error), clipped to [lower, upper]; ``crossing`` flags lower > upper."""

    sigma: float
    lower: float
    lower_stderr: float
    upper: float
    upper_stderr: float
    upper_source: str
    converged: bool
    verdict: str
    rise: float
    rise_stderr: float
    extrapolated: float
    extrapolated_stderr: float
    heldout: HeldoutPoint
    by_n: list[SizePoint]

    @property
    def crossing(self) -> str | None:
        """None where lower ≤ upper; else "within error" where lower − upper ≤ 2·√(se_l² +
        se_u²) (noise: both bound J*_pop only in expectation), "beyond error" otherwise (a real
        inconsistency: e.g. the held-out set is not drawn like the training set)."""
        if self.lower <= self.upper:
            return None
        within = self.lower - self.upper <= 2 * math.hypot(self.lower_stderr, self.upper_stderr)
        return "within error" if within else "beyond error"

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["heldout"] = self.heldout.to_json()
        out["by_n"] = [dataclasses.asdict(s) for s in self.by_n]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FloorPoint:
        return cls(
            **{
                **obj,
                "heldout": HeldoutPoint(**obj["heldout"]),
                "by_n": [SizePoint(**s) for s in obj["by_n"]],
            }
        )


@dataclass(frozen=True, kw_only=True)
class Floor(Result):
    """The floor over a σ grid (``floor``): points, both datasets and the parameters. A
    ``Result`` ("lossfloor-floor"; files tagged FORMAT, before the shared header, are read
    too): ``save`` writes what ``lossfloor floor --out`` writes, ``to_csv`` the per-σ
    bracket and verdict."""

    LEGACY_FORMAT: ClassVar[str | None] = FORMAT  # the module's (read before it is shadowed)
    FORMAT: ClassVar[str] = "lossfloor-floor"
    WHAT: ClassVar[str] = "a floor"
    DECODE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "points": lambda ps: [FloorPoint.from_json(p) for p in ps]
    }
    CSV_COLUMNS: ClassVar[Mapping[str, str]] = CSV_COLUMNS

    dataset: dict[str, Any]
    heldout: dict[str, Any]
    data_variance: float
    params: dict[str, Any]
    points: list[FloorPoint]

    @classmethod
    def from_fields(cls, body: Mapping[str, Any]) -> Self:
        """Read what ``json_fields`` writes; every field is required."""
        names = ("points", "dataset", "heldout", "data_variance", "params")
        missing = [f for f in names if f not in body]
        if missing:
            raise UserError(f"not a floor file: no {missing[0]!r}")
        try:
            return super().from_fields(body)
        except (KeyError, TypeError) as exc:
            raise UserError(f"not a floor file: {exc}") from None

    def rows(self) -> list[dict[str, Any]]:
        """The per-σ table: each point's bracket, verdict, extrapolation and ``crossing``, and
        its held-out losses (``HeldoutPoint``)."""
        return [{**p.to_json(), **p.heldout.to_json(), "crossing": p.crossing} for p in self.points]

    def plot(self, axes: Sequence[Axes] | None = None, title: str = "") -> list[Axes]:
        """The bracket, J* by subset size and the extrapolation on ``axes[0]``, the N-trend on
        ``axes[1]`` (a new pyplot figure's without): ``plots.draw_floor``. Returns the axes."""
        from lossfloor.plots import draw_floor

        return draw_floor(self, axes, title)

    def at(self, sigma: float) -> FloorPoint | None:
        """The point at σ (``same_sigma``), or None."""
        return next((p for p in self.points if same_sigma(p.sigma, sigma)), None)


def subset_sizes(n: int, levels: int = 5, sizes: Sequence[int] | None = None) -> list[int]:
    """The subset sizes: ``sizes`` (increasing, 2 ≤ n_i ≤ N; N is appended if missing) or
    N/2^(levels−1), …, N/2, N (rounded down, each ≥ 2)."""
    if sizes is None:
        if not levels >= 2:
            raise ParameterError("levels", levels, "need at least 2 sizes (N/2 and N)")
        sizes = [n >> k for k in range(levels - 1, 0, -1)]
        if sizes[0] < 2:
            raise ParameterError("levels", levels, f"N/2^{levels - 1} < 2 points for N = {n}")
    out = [int(s) for s in sizes]
    for s in out:
        if not 2 <= s <= n:
            raise ParameterError("sizes", s, f"a subset needs 2 to N = {n} points")
    if out != sorted(set(out)):
        raise ParameterError("sizes", ",".join(map(str, sizes)), "sizes must increase")
    if out[-1] != n:
        out.append(n)
    if len(out) < 2:
        raise ParameterError("sizes", ",".join(map(str, sizes)), "need a size below N")
    return out


def extrapolate(values: Sequence[float]) -> float:
    """J*_∞ from J* at n = …, N/4, N/2, N: the rise per doubling Δ_k shrinks by
    r = Δ_last/Δ_prev (clipped to [0, R_MAX]), so J*_∞ = J*(N) + Δ_last·r/(1 − r); no rise
    (Δ_last ≤ 0) gives J*(N)."""
    d_prev, d_last = values[-2] - values[-3], values[-1] - values[-2]
    if d_last <= 0:
        return values[-1]
    r = min(max(d_last / d_prev, 0.0), R_MAX) if d_prev > 0 else R_MAX
    return values[-1] + d_last * r / (1 - r)


def _extrapolation(
    by_n: list[SizePoint], seed: int, lower: float, upper: float
) -> tuple[float, float]:
    """``extrapolate`` of the size means, clipped to [lower, upper], and its error: the spread
    over 500 parametric resamples of the means within their standard errors."""
    if len(by_n) < 3:
        return lower, upper - lower
    mean = np.array([s.optimal_loss for s in by_n])
    se = np.array([s.stderr for s in by_n])
    rng = np.random.default_rng(seed)
    draws = [extrapolate(mean + se * rng.standard_normal(mean.size)) for _ in range(500)]
    clip = float(np.clip(extrapolate(mean), lower, max(lower, upper)))
    return clip, float(np.std(np.clip(draws, lower, max(lower, upper))))


def floor(
    train: Dataset,
    heldout: Dataset,
    sigmas: Sequence[float],
    *,
    levels: int = 5,
    sizes: Sequence[int] | None = None,
    repeats: int = 3,
    outer: int = 2048,
    seed: int = 0,
    draws: Draws = "auto",
    bandwidth: float | str | None = "auto",
    precision: Precision = "auto",
    device: str | torch.device = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
    checkpoint: str | os.PathLike[str] | None = None,
    restart: bool = False,
    progress: bool = True,
) -> Floor:
    """Per σ: J* of nested random subsets of ``train`` (``subset_sizes(N, levels, sizes)``,
    ``repeats`` subsets per size below N; subset r of size n is the first n points of the
    permutation r, so sizes are nested), the held-out bounds and the verdict (``FloorPoint``).
    Each J* is the full estimator with min(n, ``outer``) draws (``draws``: the estimate's
    outer noise, auto = tilted for full). With ``checkpoint`` every
    finished subset and held-out σ is saved there, and a rerun with the same data and options
    resumes (another run's file is refused unless ``restart``); the file is removed at the end.
    """
    x, xh = train.x, heldout.x
    check_heldout(x, xh)
    check_sigmas(list(sigmas))
    check_seed(seed)
    check_bandwidth(bandwidth)
    check_outer(outer)
    if not repeats >= 1:
        raise ParameterError("repeats", repeats, "need at least 1 subset per size")
    sizes = subset_sizes(train.n, levels, sizes)
    params = {
        "sizes": sizes,
        "repeats": repeats,
        "outer": outer,
        "seed": seed,
        "draws": draws,
        "bandwidth": bandwidth,
        "precision": precision,
        "memorised_below": MEMORISED,
    }
    key = [FORMAT, train.sha256, heldout.sha256, list(map(float, sigmas)), params]
    saved = None if checkpoint is None else _open(checkpoint, key, restart)
    perms = [
        torch.randperm(train.n, generator=generator_for(seed, Stream.FLOOR_SUBSETS, r))
        for r in range(repeats)
    ]
    work = [(n, r) for n in sizes for r in range(repeats if n < train.n else 1)]
    by_size: dict[int, list[list[tuple[float, float]]]] = {n: [] for n in sizes}
    for n, r in progress_bar(work, desc="subsets", unit="subset", enabled=progress):

        def subset_curve(n: int = n, r: int = r) -> list[list[float]]:
            subset = x if n == train.n else x[perms[r][:n]]
            curve = estimate_curve(
                subset,
                sigmas,
                ESTIMATORS.create("full"),
                outer=min(n, outer),
                seed=seed,
                draws=draws,
                precision=precision,
                device=device,
                tile_bytes=tile_bytes,
                progress=False,
            )
            return [[p.optimal_loss, p.stderr] for p in curve.points]

        values = _unit(saved, f"subset n={n} r={r}", subset_curve)
        by_size[n].append([(v, se) for v, se in values])
    held_run = functools.cache(
        lambda: _Heldout(
            x,
            xh,
            outer=min(heldout.n, outer),
            seed=seed,
            bandwidth=bandwidth,
            validation=VALIDATION_DRAWS,
            precision=precision,
            device=device,
            tile_bytes=tile_bytes,
        )
    )  # set up once, and only if a held-out σ is not in the checkpoint
    held = [
        HeldoutPoint(
            **_unit(saved, f"heldout σ[{i}]", lambda s=sigma: held_run().point(s).to_json())
        )
        for i, sigma in enumerate(
            progress_bar(sigmas, desc="held-out σ", unit="σ", enabled=progress)
        )
    ]
    variance = mean_and_variance(x)[1]
    points = [
        _floor_point(i, sigma, sizes, by_size, held[i], variance, seed)
        for i, sigma in enumerate(sigmas)
    ]
    if saved is not None:
        saved.remove()
    return Floor(
        points=points,
        dataset=train.describe(),
        heldout=heldout.describe(),
        data_variance=variance,
        params=params,
    )


def _open(path: str | os.PathLike[str], key: Any, restart: bool) -> Checkpoint:
    """The floor's checkpoint at ``path`` under ``key`` (logging at INFO what it holds)."""
    saved = Checkpoint.open(path, checkpoint_key(key), "a floor", restart)
    if saved.done:
        log.info("resuming: %d finished units in %s", len(saved.done), path)
    return saved


def _unit(saved: Checkpoint | None, name: str, compute: Callable[[], Any]) -> Any:
    """The saved result of unit ``name``, or ``compute()`` (then saved)."""
    return compute() if saved is None else saved.unit(name, compute)


def size_verdict(by_n: Sequence[SizePoint], variance: float) -> str:
    """The verdict on J*'s N-trend (sizes ascending, the last N). With Δ = J*(N) − J*(n) and
    s.e.(Δ) = √(se_N² + se_n²) for each of the two next sizes n below N (N/2 and N/4 on the
    default ladder): ``memorised`` where J*(N) < MEMORISED·variance; ``converged`` where every
    |Δ| + 2·s.e.(Δ) ≤ CONVERGED_DRIFT·J*(N) (the data rule out a change above that, at about
    95%); ``rising`` where some |Δ| > 2·s.e.(Δ) (a change is shown); ``undecided`` otherwise
    (no change shown, none above CONVERGED_DRIFT ruled out: more repeats or draws decide)."""
    last = by_n[-1]
    if last.optimal_loss < MEMORISED * variance:
        return "memorised"
    below = by_n[-3:-1]
    steps = [
        (abs(last.optimal_loss - b.optimal_loss), math.hypot(last.stderr, b.stderr)) for b in below
    ]
    if all(d + 2 * e <= CONVERGED_DRIFT * last.optimal_loss for d, e in steps):
        return "converged"
    return "rising" if any(d > 2 * e for d, e in steps) else "undecided"


def _floor_point(
    i: int,
    sigma: float,
    sizes: list[int],
    by_size: dict[int, list[list[tuple[float, float]]]],
    held: HeldoutPoint,
    variance: float,
    seed: int,
) -> FloorPoint:
    by_n = []
    for n in sizes:
        vals = np.array([run[i][0] for run in by_size[n]])
        ses = np.array([run[i][1] for run in by_size[n]])
        spread = vals.std(ddof=1) / math.sqrt(vals.size) if vals.size > 1 else 0.0
        own = math.sqrt(float((ses**2).sum())) / vals.size
        by_n.append(
            SizePoint(
                n=n, optimal_loss=float(vals.mean()), stderr=max(spread, own), repeats=vals.size
            )
        )
    last, half = by_n[-1], by_n[-2]
    rise = last.optimal_loss - half.optimal_loss
    rise_se = math.hypot(last.stderr, half.stderr)
    bounds = [("heldout", held.heldout_loss, held.heldout_stderr)]
    if held.smoothed_loss is not None:
        bounds.append(("smoothed", held.smoothed_loss, held.smoothed_stderr))
    source, upper, upper_se = min(bounds, key=lambda b: b[1])
    verdict = size_verdict(by_n, variance)
    extra, extra_se = (
        (last.optimal_loss, last.stderr)
        if verdict in ("converged", "memorised")
        else _extrapolation(by_n, seed, last.optimal_loss, upper)
    )
    return FloorPoint(
        sigma=float(sigma),
        lower=last.optimal_loss,
        lower_stderr=last.stderr,
        upper=upper,
        upper_stderr=upper_se,
        upper_source=source,
        converged=verdict == "converged",
        verdict=verdict,
        rise=rise,
        rise_stderr=rise_se,
        extrapolated=extra,
        extrapolated_stderr=extra_se,
        heldout=held,
        by_n=by_n,
    )


def with_heldout(
    curve: Curve,
    train: Dataset,
    heldout: Dataset,
    *,
    outer: int | None = None,
    bandwidth: float | str | None = None,
    precision: str = "auto",
    device: str | torch.device = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
    progress: bool = False,
) -> Curve:
    """``curve`` (J* of ``train``) with each point's held-out losses (``heldout_losses`` with
    the curve's seed; M = ``outer``, default the held-out size) and ``sources`` = the held-out
    dataset's description."""
    if curve.dataset is not None and curve.dataset.get("conditional"):
        raise ParameterError("sources", heldout.name, "held-out sources need an unconditional J*")
    held = heldout_losses(
        train.x,
        heldout.x,
        [p.sigma for p in curve.points],
        outer=outer,
        seed=curve.seed or 0,
        bandwidth=bandwidth,
        precision=precision,
        device=device,
        tile_bytes=tile_bytes,
        progress=progress,
    )
    points = tuple(
        dataclasses.replace(p, **{k: v for k, v in h.to_json().items() if k != "sigma"})
        for p, h in zip(curve.points, held, strict=True)
    )
    return dataclasses.replace(curve, points=points, sources=heldout.describe())


#: Readings of a gap against a floor (``read_heldout``).
READINGS = ("underfitting", "provable headroom", "within the bracket")


def reading(point: GapPoint, heldout: tuple[float, float], at: FloorPoint) -> str:
    """The gap at σ read through the floor: ``underfitting`` where J* is converged in N and the
    gap exceeds 2 standard errors (J*_train ≈ J*_pop, so the gap is headroom a model can
    reach); ``provable headroom`` where the model's held-out loss exceeds the least held-out
    bound by 2 standard errors (another fixed denoiser generalises better); otherwise
    ``within the bracket`` (the headroom is at most the model's held-out loss − J*_train)."""
    if at.converged and point.gap > 2 * point.gap_stderr:
        return READINGS[0]
    loss, se = heldout
    if loss - at.upper > 2 * math.hypot(se, at.upper_stderr):
        return READINGS[1]
    return READINGS[2]


def check_floor(result: Floor, dataset: Dataset, sigmas: Sequence[float]) -> None:
    """A floor of this dataset with a point at every σ of the grid."""
    if result.dataset.get("sha256") != dataset.sha256:
        raise ParameterError("floor", result.dataset.get("name"), "is the floor of other data")
    missing = [s for s in sigmas if result.at(s) is None]
    if missing:
        raise ParameterError("floor", f"σ = {missing[0]:g}", "has no point at this σ of the grid")


def read_heldout(
    diagnosis: Diagnosis,
    model: Callable[..., Tensor],
    train: Dataset,
    heldout: Dataset,
    *,
    floor_result: Floor | None = None,
    batch: int = 256,
    use_labels: bool = False,
    device: str | torch.device = "cpu",
) -> Diagnosis:
    """``diagnosis`` with each point's held-out model loss E‖D_θ(x0_h + σε) − x0_h‖²/D (draws
    as the diagnosis': outer M and seed, over ``heldout``) and, with the floor of ``train``, its
    ``reading``."""
    from lossfloor.diagnosis import model_per_sample_loss

    check_heldout(train.x, heldout.x)
    if floor_result is not None:
        check_floor(floor_result, train, [p.sigma for p in diagnosis.points])
    if use_labels and heldout.labels is None:
        raise ParameterError("heldout", heldout.name, "has no labels for a conditional model")
    plan = OuterPlan.build(heldout.x, heldout.labels, diagnosis.outer, diagnosis.seed, False)
    labels = heldout.labels if use_labels else None
    points = []
    for p in diagnosis.points:
        per = model_per_sample_loss(
            model, heldout, plan, p.sigma, batch, torch.device(device), labels
        )
        loss = mean_and_stderr(per)
        read = None if floor_result is None else reading(p, loss, floor_result.at(p.sigma))
        points.append(
            dataclasses.replace(
                p, heldout_model_loss=loss[0], heldout_model_loss_stderr=loss[1], reading=read
            )
        )
    return dataclasses.replace(diagnosis, points=tuple(points), heldout=heldout.describe())

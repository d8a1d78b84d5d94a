"""J*(σ) on nested random subsets of the training set (n = N/2^k … N) and the per-σ verdict on
its N-trend (docs/floor.md): E[J*] of a random n-subset rises toward J*_pop as n grows, so J*
that no longer moves between the last doublings of n is converged, and a trend that still rises
is extrapolated (a geometric series). ``floor`` runs the subsets and the held-out bounds
(``heldout``) and assembles the ``Floor``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from lossfloor.data import Dataset, mean_and_variance
from lossfloor.data.dataset import posterior_variance
from lossfloor.errors import ParameterError
from lossfloor.floor.heldout import (
    VALIDATION_DRAWS,
    HeldoutPoint,
    HeldoutRun,
    check_bandwidth,
    check_heldout,
    check_same_kind,
)
from lossfloor.floor.result import FORMAT, Floor, FloorPoint, SizePoint
from lossfloor.optimal.checkpoint import Checkpoint, checkpoint_key
from lossfloor.optimal.draws import Draws, check_outer, check_seed
from lossfloor.optimal.estimate import estimate_curve
from lossfloor.optimal.estimators import ESTIMATORS
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.precision import Precision, check_sigmas
from lossfloor.progress import progress_bar
from lossfloor.seeding import Stream, generator_for

log = logging.getLogger(__name__)
Tensor = torch.Tensor

#: J* at σ of one subset per σ of the grid: [(mean, stderr), …].
SubsetValues = list[tuple[float, float]]

#: J*(N) below this fraction of the data variance is memorisation, not a converged floor.
MEMORISED = 1e-3

#: Converged: the change of J* over each of the last two doublings of n, plus 2 standard
#: errors, within this fraction of J*(N) (the data must rule out a larger change, not merely
#: fail to show one); about what 3 repeats of M = 2,048 resolve where J* ≥ 0.1·variance.
CONVERGED_DRIFT = 0.05

#: Extrapolation: the rise per doubling of n shrinks by a ratio r ≤ R_MAX (a geometric series).
R_MAX = 0.95


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


def extrapolate(values: Sequence[float] | npt.NDArray[np.float64]) -> float:
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


def size_points(
    sizes: Sequence[int], by_size: dict[int, list[SubsetValues]], i: int
) -> list[SizePoint]:
    """J* at σ[i] by subset size: the mean over a size's subsets and its standard error, the
    larger of the spread over subsets/√repeats and the draws' own errors √(Σ se²)/repeats."""
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
    return by_n


def floor_point(
    sigma: float, by_n: list[SizePoint], held: HeldoutPoint, variance: float, seed: int
) -> FloorPoint:
    """The floor at σ from J* by subset size and the held-out losses: lower = J*(N), upper =
    the least held-out bound, the rise over the last doubling, the verdict (``size_verdict``)
    and J*_∞ (J*(N) where converged or memorised, else ``_extrapolation`` with seed)."""
    last, half = by_n[-1], by_n[-2]
    rise = last.optimal_loss - half.optimal_loss
    rise_se = math.hypot(last.stderr, half.stderr)
    source, upper, upper_se = min(held.bounds(), key=lambda b: b[1])
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


@dataclass(frozen=True, kw_only=True)
class FloorRun:
    """What the steps of ``floor`` share: both datasets, the σ grid, the subset sizes (from
    ``levels`` or the requested ``sizes``: ``subset_sizes``) and the options (``floor``'s
    parameters), checked on construction; each step is a method."""

    train: Dataset
    heldout: Dataset
    sigmas: Sequence[float]
    levels: InitVar[int]
    requested: InitVar[Sequence[int] | None]
    sizes: list[int] = field(init=False)
    repeats: int
    outer: int
    seed: int
    draws: Draws
    bandwidth: float | str | None
    precision: Precision
    device: str | torch.device
    tile_bytes: int
    progress: bool

    def __post_init__(self, levels: int, requested: Sequence[int] | None) -> None:
        """Check the data, σ grid, seed, bandwidth, draws and repeats (in this order), then
        set the subset sizes."""
        check_heldout(self.train.x, self.heldout.x)
        check_same_kind(self.train.std, self.heldout.std)
        check_sigmas(list(self.sigmas))
        check_seed(self.seed)
        check_bandwidth(self.bandwidth)
        check_outer(self.outer)
        if not self.repeats >= 1:
            raise ParameterError("repeats", self.repeats, "need at least 1 subset per size")
        object.__setattr__(self, "sizes", subset_sizes(self.train.n, levels, requested))

    def params(self) -> dict[str, Any]:
        """The options that a floor file records and the checkpoint's key holds."""
        return {
            "sizes": self.sizes,
            "repeats": self.repeats,
            "outer": self.outer,
            "seed": self.seed,
            "draws": self.draws,
            "bandwidth": self.bandwidth,
            "precision": self.precision,
            "memorised_below": MEMORISED,
        }

    def key(self) -> list[Any]:
        """The checkpoint's key: FORMAT, both datasets' sha256, the σ grid and ``params``."""
        sigmas = list(map(float, self.sigmas))
        return [FORMAT, self.train.sha256, self.heldout.sha256, sigmas, self.params()]

    def work(self) -> list[tuple[int, int]]:
        """The subsets (n, r) in run order, the checkpoint's units "subset n={n} r={r}":
        ``repeats`` subsets of each size below N, then the whole training set (r = 0)."""
        return [(n, r) for n in self.sizes for r in range(self.repeats if n < self.train.n else 1)]

    def subset_values(self, n: int, perm: Tensor) -> list[list[float]]:
        """[J*, stderr] at each σ of the subset of the first n points of ``perm`` (the whole
        training set at n = N): the full estimator with min(n, outer) draws (of Gaussian items,
        J* of the subset's mixture)."""
        x, std = self.train.x, self.train.std
        subset: Tensor | Dataset = x if n == self.train.n else x[perm[:n]]
        if std is not None:  # the items with their stds, unconditional (as points' subsets)
            keep = slice(None) if n == self.train.n else perm[:n]
            subset = dataclasses.replace(self.train, x=x[keep], std=std[keep], labels=None)
        curve = estimate_curve(
            subset,
            self.sigmas,
            ESTIMATORS.create("full"),
            outer=min(n, self.outer),
            seed=self.seed,
            draws=self.draws,
            precision=self.precision,
            device=self.device,
            tile_bytes=self.tile_bytes,
            progress=False,
        )
        return [[p.optimal_loss, p.stderr] for p in curve.points]

    def subsets(self, saved: Checkpoint | None) -> dict[int, list[SubsetValues]]:
        """Size → J* of each of its subsets (``work``, saved unit by unit); subset r of every
        size takes the permutation r of stream FLOOR_SUBSETS, so the sizes are nested."""
        perms = [
            torch.randperm(
                self.train.n, generator=generator_for(self.seed, Stream.FLOOR_SUBSETS, r)
            )
            for r in range(self.repeats)
        ]
        by_size: dict[int, list[SubsetValues]] = {n: [] for n in self.sizes}
        for n, r in progress_bar(self.work(), desc="subsets", unit="subset", enabled=self.progress):
            compute = functools.partial(self.subset_values, n, perms[r])
            values = _unit(saved, f"subset n={n} r={r}", compute)
            by_size[n].append([(v, se) for v, se in values])
        return by_size

    @functools.cached_property
    def heldout_run(self) -> HeldoutRun:
        """The held-out draws (M = min(held-out size, outer)), set up on first use: only if a
        held-out σ is not in the checkpoint."""
        return HeldoutRun(
            self.train.x,
            self.heldout.x,
            outer=min(self.heldout.n, self.outer),
            seed=self.seed,
            bandwidth=self.bandwidth,
            validation=VALIDATION_DRAWS,
            precision=self.precision,
            device=self.device,
            tile_bytes=self.tile_bytes,
            train_std=self.train.std,
            heldout_std=self.heldout.std,
        )

    def heldout_json(self, sigma: float) -> dict[str, Any]:
        """The held-out losses at σ as the checkpoint saves them (``HeldoutPoint.to_json``)."""
        return self.heldout_run.point(sigma).to_json()

    def heldout_points(self, saved: Checkpoint | None) -> list[HeldoutPoint]:
        """The held-out losses at each σ, saved as units "heldout σ[i]"."""
        sigmas = progress_bar(self.sigmas, desc="held-out σ", unit="σ", enabled=self.progress)
        return [
            HeldoutPoint(**_unit(saved, f"heldout σ[{i}]", functools.partial(self.heldout_json, s)))
            for i, s in enumerate(sigmas)
        ]

    def result(self, by_size: dict[int, list[SubsetValues]], held: list[HeldoutPoint]) -> Floor:
        """The ``Floor``: a ``floor_point`` per σ, both datasets and ``params``."""
        variance = mean_and_variance(self.train.x)[1]
        if self.train.std is not None:  # Gaussian items: the variance within them too
            variance += posterior_variance(self.train.std)
        points = [
            floor_point(sigma, size_points(self.sizes, by_size, i), held[i], variance, self.seed)
            for i, sigma in enumerate(self.sigmas)
        ]
        return Floor(
            points=points,
            dataset=self.train.describe(),
            heldout=self.heldout.describe(),
            data_variance=variance,
            params=self.params(),
        )


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
    run = FloorRun(
        train=train,
        heldout=heldout,
        sigmas=sigmas,
        levels=levels,
        requested=sizes,
        repeats=repeats,
        outer=outer,
        seed=seed,
        draws=draws,
        bandwidth=bandwidth,
        precision=precision,
        device=device,
        tile_bytes=tile_bytes,
        progress=progress,
    )
    saved = None if checkpoint is None else _open(checkpoint, run.key(), restart)
    by_size = run.subsets(saved)
    held = run.heldout_points(saved)
    result = run.result(by_size, held)
    if saved is not None:
        saved.remove()
    return result


def _open(path: str | os.PathLike[str], key: Any, restart: bool) -> Checkpoint:
    """The floor's checkpoint at ``path`` under ``key`` (logging at INFO what it holds)."""
    saved = Checkpoint.open(path, checkpoint_key(key), "a floor", restart)
    if saved.done:
        log.info("resuming: %d finished units in %s", len(saved.done), path)
    return saved


def _unit(saved: Checkpoint | None, name: str, compute: Callable[[], Any]) -> Any:
    """The saved result of unit ``name``, or ``compute()`` (then saved)."""
    return compute() if saved is None else saved.unit(name, compute)

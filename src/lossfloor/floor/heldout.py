"""Held-out upper bounds on J*_pop(σ) (docs/floor.md): the held-out losses of the training
set's optimal denoiser μ_train and of its smoothed version D_b, the posterior mean under a
Gaussian kernel density estimate of the training set (bandwidth b):

    D_b(x, σ) = (σ²·μ_s(x) + b²·x)/(σ² + b²),   s = √(σ² + b²),

with μ_s the optimal denoiser of the training set at noise level s (the same kernel). Any
denoiser fixed without the held-out data has expected held-out loss ≥ J*_pop.

Of Gaussian items (VAE latents: both sets N(m_i, diag s_i²)), μ_train is the posterior mean of
the training items' mixture (``mixture.MixturePool``), each held-out x0 = m_h + s_h⊙z is drawn
from its item (z as the estimate draws it, ``Block.component``), and D_b, the posterior mean
under the mixture of N(m_i, diag(s_i² + b²)), takes the same formula with μ_s the mixture's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from lossfloor.device import resolve_device
from lossfloor.errors import ParameterError
from lossfloor.optimal.blocks import outer_blocks
from lossfloor.optimal.draws import OuterPlan, check_outer, check_seed, stratified_sources
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.mixture import gaussian_draws
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
from lossfloor.seeding import Stream

Tensor = torch.Tensor

#: Candidate bandwidths of ``bandwidth="auto"``, in units of the data's per-element std.
AUTO_BANDWIDTHS = tuple(float(b) for b in np.geomspace(0.01, 1.0, 9))

#: Leave-one-out draws that score each candidate bandwidth of ``bandwidth="auto"`` (at most N).
VALIDATION_DRAWS = 512


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
    (1/N)·Σ_n 𝒩(x0; x_n, b²I) (b = 0 is μ_σ; of Gaussian items (1/N)·Σ_n 𝒩(x0; m_n,
    diag(s_n² + b²)): x0 = y + b·w, y from the mixture, so E[y | q] = μ_s(q) and
    E[b·w | q − y] = b²/(σ² + b²)·(q − y)). ``exclude`` (B pool indices) leaves each query's
    own item out of the sum (leave-one-out validation)."""
    s = math.sqrt(sigma * sigma + bandwidth * bandwidth)
    state = pool.merge(pool.accumulate(queries, s, exclude=exclude, tile_bytes=tile_bytes))
    mu = pool.posterior(state, queries)
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

    def bounds(self) -> list[tuple[str, float, float]]:
        """The upper bounds it holds as (source, loss, stderr): "heldout", then "smoothed"
        where there is a bandwidth."""
        out = [("heldout", self.heldout_loss, self.heldout_stderr)]
        if self.smoothed_loss is not None and self.smoothed_stderr is not None:
            out.append(("smoothed", self.smoothed_loss, self.smoothed_stderr))
        return out


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


def check_same_kind(train_std: Tensor | None, heldout_std: Tensor | None) -> None:
    """Both sets Gaussian items, or both points: a held-out loss bounds J* of the held-out
    items' distribution, which the training items sample only where they are of one kind."""
    if (train_std is None) != (heldout_std is None):
        kinds = (
            ("Gaussian items", "points") if heldout_std is None else ("points", "Gaussian items")
        )
        raise ParameterError(
            "heldout", kinds[1], f"the training set holds {kinds[0]}: a held-out loss bounds "
            "J* of the held-out distribution, the training set's only where both hold one kind "
            "of item (give both as Gaussian items, or both as points)",
        )  # fmt: skip


def check_bandwidth(bandwidth: float | str | None) -> None:
    """None, ``"auto"`` or a finite b ≥ 0."""
    if bandwidth is None or bandwidth == "auto":
        return
    if not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth >= 0):
        raise ParameterError("bandwidth", bandwidth, "expected auto or a finite number ≥ 0")


class TrainingPools:
    """The training pool in each dtype a precision policy asks for (``pool_cache.PoolsByDtype`` of
    the training set as one group; of Gaussian items with their stds ``train_std``, a mixture
    pool), and the dtype at σ (the fp32 error bound over training and held-out norms)."""

    def __init__(
        self,
        train: Tensor,
        heldout_max_sq: float,
        device: torch.device,
        train_std: Tensor | None = None,
    ) -> None:
        self.train, self.device, self.heldout_max_sq = train, device, heldout_max_sq
        self.train_std = train_std
        # the plan's draws play no part: its one group of every point is what the pools are of
        plan = OuterPlan.build(train, None, max(2, train.shape[0]), 0, False, train_std)
        self.by_dtype = PoolsByDtype(plan, device)

    def __call__(self, dtype: torch.dtype) -> Pool:
        return self.by_dtype(dtype)[0]

    def dtype_at(self, precision: Precision, sigma: float) -> torch.dtype:
        pool = self(base_dtype(precision))
        bound = dataclasses.replace(pool, max_sq=max(pool.max_sq, self.heldout_max_sq))
        return choose_dtype(precision, [bound], sigma)


def _losses(
    pools: TrainingPools,
    x0: Tensor,
    sources: Tensor,
    sigma: float,
    bandwidths: Sequence[float],
    *,
    seed: int,
    stream: Stream,
    precision: Precision,
    tile_bytes: int,
    exclude: bool = False,
    var: Tensor | None = None,
) -> Tensor:
    """Per-sample ‖x0_s − D_b(x0_s + σε)‖²/D for each b (K×M, float64; b = 0 is μ_σ); ε from the
    stream (seed, stream, block) in the blocks of ``blocks.outer_blocks``: the estimate's ε when
    stream is ``Stream.OUTER_NOISE``. Of Gaussian items (their variances ``var``, float64), x0
    of source s is m_s + s_s⊙z (``mixture.gaussian_draws``, z the estimate's
    ``Block.component``). Values that overflow the dtype follow the ``precision.Overflow``
    policy."""

    def compute(dtype: torch.dtype) -> Tensor:
        pool = pools(dtype)
        d = x0.shape[1]
        out = torch.empty(len(bandwidths), sources.numel(), dtype=torch.float64)
        for block in outer_blocks(sources, seed, d, stream=stream):
            src = block.sources.to(pool.device)
            if var is None:
                x = x0[src].to(dtype)
            else:
                x = gaussian_draws(x0[src], var[src], block.component, dtype)
            q = x + sigma * block.noise.to(device=pool.device, dtype=dtype)
            for k, b in enumerate(bandwidths):
                excl = src if exclude else None
                if b == 0 and not exclude:
                    state = pool.merge(pool.accumulate(q, sigma, tile_bytes=tile_bytes))
                    mu = pool.posterior(state, q)
                else:
                    mu = smoothed_posterior_mean(pool, q, sigma, b, exclude=excl,
                                                 tile_bytes=tile_bytes)  # fmt: skip
                out[k, block.lo : block.hi] = ((x - mu).double().pow(2).sum(dim=1) / d).cpu()
        return out

    dtype = pools.dtype_at(precision, sigma)
    return Overflow(precision).run(sigma, dtype, compute, finite)[0]


def choose_bandwidth(
    pools: TrainingPools,
    sigma: float,
    *,
    outer: int,
    seed: int,
    precision: Precision = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> float:
    """The b of AUTO_BANDWIDTHS (× the data's per-element std) with the least leave-one-out
    loss on the training set: M draws x0_n + σε scored by D_b over the other N − 1 points. The
    held-out set plays no part, so D_b stays a fixed denoiser for it (a valid upper bound)."""
    pool = pools(base_dtype(precision))
    scale = math.sqrt(pool.a / pool.dim)
    candidates = [b * scale for b in AUTO_BANDWIDTHS]
    sources = stratified_sources(pool.n, outer, seed)
    x0 = pool.centre(pools.train)
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
        var=_variances(pools.train_std, x0),
    )
    return candidates[int(losses.mean(dim=1).argmin())]


class HeldoutRun:
    """The held-out draws of ``heldout_losses``, set up once (the training pools, the centred
    held-out points (of Gaussian items, their means and variances), the sources); ``point(σ)``
    computes one σ."""

    def __init__(
        self,
        train: Tensor,
        heldout: Tensor,
        *,
        outer: int | None,
        seed: int,
        bandwidth: float | str | None,
        validation: int,
        precision: Precision,
        device: str | torch.device,
        tile_bytes: int,
        train_std: Tensor | None = None,
        heldout_std: Tensor | None = None,
    ) -> None:
        check_heldout(train, heldout)
        check_same_kind(train_std, heldout_std)
        check_seed(seed)
        check_bandwidth(bandwidth)
        m = heldout.shape[0] if outer is None else outer
        check_outer(m)
        self.pools = TrainingPools(train, 0.0, resolve_device(device), train_std)
        self.x0 = self.pools(base_dtype(precision)).centre(heldout)
        self.var = _variances(heldout_std, self.x0)
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
            var=self.var,
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
    precision: Precision = "auto",
    device: str | torch.device = "auto",
    tile_bytes: int = DEFAULT_TILE_BYTES,
    progress: bool = False,
    train_std: Tensor | None = None,
    heldout_std: Tensor | None = None,
) -> list[HeldoutPoint]:
    """Per σ, the held-out losses of μ_train and (with ``bandwidth``: a number, or ``"auto"``
    = ``choose_bandwidth`` per σ on min(``validation``, N) draws) of D_b.

    M = ``outer`` (default: the held-out size) draws x0 from ``heldout`` (stratified as the
    estimate draws its sources) with the estimate's plain noise ε ~ N(0, I) (the loss of a
    fixed denoiser on unseen points needs no tilting), so with heldout = train and b = None
    ``heldout_loss`` equals the direct form of ``estimate_curve``'s full estimator with
    ``draws="plain"`` on the same draws, bitwise. With ``train_std`` and ``heldout_std``
    (their stds), both sets are Gaussian items (see the module docstring): with heldout = train
    and b = None, ``heldout_loss`` is again the estimate's direct form on the same draws.
    """
    check_sigmas(list(sigmas))
    run = HeldoutRun(
        train,
        heldout,
        outer=outer,
        seed=seed,
        bandwidth=bandwidth,
        validation=validation,
        precision=precision,
        device=device,
        tile_bytes=tile_bytes,
        train_std=train_std,
        heldout_std=heldout_std,
    )
    return [
        run.point(s) for s in progress_bar(sigmas, desc="held-out σ", unit="σ", enabled=progress)
    ]


def _variances(std: Tensor | None, like: Tensor) -> Tensor | None:
    """s² of Gaussian items (N×D, float64, where ``like`` is: their centred means), or None."""
    if std is None:
        return None
    return std.reshape(like.shape).to(device=like.device, dtype=torch.float64).pow(2)

"""The one loop over blocks of outer draws (``outer_blocks``) and the per-draw values of both
forms of J*(σ) on it (``per_sample_values``).

Block j holds draws j·OUTER_BLOCK … (j + 1)·OUTER_BLOCK − 1 of a list of sources and their
noise ε ~ N(0, I) from the generator (seed, stream, j): the sources may be a plan's or another
dataset's (held-out losses), the stream the estimate's ε or another purpose's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from lossfloor.optimal.draws import OUTER_BLOCK, OuterPlan, block_noise, tilt_group
from lossfloor.optimal.estimators import Estimator, PerSample
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES
from lossfloor.optimal.pools import Pool
from lossfloor.optimal.precision import closed_rounding
from lossfloor.seeding import Stream, generator_for

Tensor = torch.Tensor


@dataclass
class Block:
    """Outer block ``index``: draws ``lo`` … ``hi`` − 1, their ``sources`` and (drawn on first
    use) their plain ``noise`` ε (float64, ``block_noise`` of (seed, stream, index))."""

    index: int
    lo: int
    hi: int
    sources: Tensor
    seed: int
    dim: int
    stream: Stream

    @cached_property
    def noise(self) -> Tensor:
        return block_noise(self.seed, self.index, self.hi - self.lo, self.dim, self.stream)

    @cached_property
    def component(self) -> Tensor:
        """z of Gaussian items' x0 = m + s⊙z (float64 N(0, I) from (seed, COMPONENT, index))."""
        return block_noise(self.seed, self.index, self.hi - self.lo, self.dim, Stream.COMPONENT)


def outer_blocks(
    sources: Tensor, seed: int, dim: int, *, stream: Stream = Stream.OUTER_NOISE, first: int = 0
) -> Iterator[Block]:
    """The blocks of OUTER_BLOCK draws of ``sources`` (the last one shorter), from block
    ``first`` on, each with its ε in ``dim`` dimensions."""
    m = sources.numel()
    for j in range(first, math.ceil(m / OUTER_BLOCK)):
        lo, hi = j * OUTER_BLOCK, min(m, (j + 1) * OUTER_BLOCK)
        yield Block(j, lo, hi, sources[lo:hi], seed, dim, stream)


def per_sample_values(
    plan: OuterPlan,
    estimator: Estimator,
    sigma: float,
    dtype: torch.dtype,
    device: torch.device,
    pools: list[Pool],
    tile_bytes: int = DEFAULT_TILE_BYTES,
    on_block: Callable[[], None] | None = None,
    draws: str = "plain",
    tilt_cache: dict | None = None,
    first_block: int = 0,
) -> PerSample:
    """Both forms for every outer sample at σ (float64, in the order of ``plan.sources``); on
    Gaussian items each draw's x0 = m + s⊙z with z of (seed, ``Stream.COMPONENT``, block).

    ``draws``: ``plain`` ε ~ N(0, I), or ``tilted`` (``draws.tilted_noise``; the pools need
    their neighbour tables), whose values are the unbiased terms w·direct and A/D +
    w·(closed − A/D) (w the likelihood ratio, returned as ``weight``; 1 in a pool of one point):
    their means estimate J* like the plain draws'. ``tilt_cache`` keeps each block's
    ``TiltBlock`` for the next σ. ``first_block`` > 0: only the draws from that block on (the
    values of the rest, in order)."""
    start = first_block * OUTER_BLOCK
    acc = _Values.empty(plan.outer - start, draws == "tilted")
    for block in outer_blocks(plan.sources, plan.seed, pools[0].dim, first=first_block):
        inner_g = generator_for(plan.seed, Stream.INNER, block.index)
        for g, ((_, local), pool) in enumerate(zip(plan.groups, pools, strict=True)):
            src = block.sources
            sel = torch.nonzero(local[src] >= 0).flatten() if len(plan.groups) > 1 else None
            s_local = local[src] if sel is None else local[src[sel]]
            if s_local.numel() == 0:
                continue
            eps = block.noise if sel is None else block.noise[sel]
            z = None  # Gaussian items: x0 = m + s⊙z
            if pool.gaussian:
                z = block.component if sel is None else block.component[sel]
            weight = None
            if draws == "tilted" and pool.n > 1:
                eps, weight = tilt_group(plan, block.index, g, pool, s_local.to(device), eps,
                                         sigma, tilt_cache)  # fmt: skip
            out = estimator(pool, s_local.to(device), eps.to(device=device, dtype=dtype), sigma,
                            inner_g, tile_bytes, component=z)  # fmt: skip
            if weight is not None:
                out = acc.weigh(out, weight, pool, sigma, dtype)
            at = block.lo - start
            acc.put(slice(at, block.hi - start) if sel is None else sel + at, out, weight)
        if on_block is not None:
            on_block()
    return acc.samples()


@dataclass
class _Values:
    """The per-draw values of ``per_sample_values`` as they are filled in, block by block; on
    tilted draws also the likelihood ratios and Σ w·(the closed form's rounding bound)."""

    closed: Tensor
    direct: Tensor
    ratio: Tensor | None
    rounding: float = 0.0

    @classmethod
    def empty(cls, m: int, tilted: bool) -> _Values:
        ratio = torch.ones(m, dtype=torch.float64) if tilted else None
        return cls(torch.empty(m, dtype=torch.float64), torch.empty(m, dtype=torch.float64), ratio)

    def weigh(
        self, out: PerSample, weight: Tensor, pool: Pool, sigma: float, dtype: torch.dtype
    ) -> PerSample:
        """The unbiased terms A/D + w·(closed − A/D) and w·direct of tilted draws (their
        rounding bound added up)."""
        w = weight.to(out.direct.device)
        self.rounding += (w * closed_rounding(pool, sigma, dtype, out.closed)).sum().item()
        base = pool.a / pool.dim
        return PerSample(closed=base + w * (out.closed - base), direct=w * out.direct)

    def put(self, where: slice | Tensor, out: PerSample, weight: Tensor | None) -> None:
        self.closed[where] = out.closed.cpu()
        self.direct[where] = out.direct.cpu()
        if weight is not None and self.ratio is not None:
            self.ratio[where] = weight.cpu()

    def samples(self) -> PerSample:
        if self.ratio is None:
            return PerSample(closed=self.closed, direct=self.direct)
        m = self.closed.numel()
        return PerSample(closed=self.closed, direct=self.direct, weight=self.ratio,
                         closed_error=self.rounding / m)  # fmt: skip

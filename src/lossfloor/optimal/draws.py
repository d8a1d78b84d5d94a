"""The outer draws: M draws (x0, ε) of a dataset, defined independently of chunk sizes, thread
counts and σ. The M outer samples are cut into fixed blocks of ``OUTER_BLOCK``; block j's noise
and inner random sets come from generators seeded by (seed, j). Sources are stratified: every
point is used ⌊M/N⌋ or ⌈M/N⌉ times. The same draws serve every σ of a grid, so a curve is smooth
and differences between σ (or between estimators, or between a model and the optimum) are
paired. Tilted draws (``tilted_noise``) shift part of them toward each source's neighbours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, cast, get_args

import torch

from lossfloor.data.chunked import ChunkedDataset
from lossfloor.data.dataset import fingerprint
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.capabilities import resolve_option
from lossfloor.optimal.estimators import Estimator, PerSample
from lossfloor.optimal.pools import Pool
from lossfloor.seeding import Stream, generator_for

Tensor = torch.Tensor

#: Outer samples per block: part of the definition of the draws (not a memory knob).
OUTER_BLOCK = 1024

#: Bytes per outer draw held at once (source index, both forms in float64): M is checked
#: against the machine's memory before any work.
BYTES_PER_DRAW = 24

#: The draws' option, as a type (``estimate_curve``'s signature) and as a tuple.
Draws = Literal["auto", "tilted", "plain"]
DRAWS: tuple[Draws, ...] = get_args(Draws)

#: The tilted draws' mixture: the share α of draws shifted toward a neighbour, and how many of
#: the source's nearest neighbours the shifted components cover.
TILT_SHARE = 0.5
TILT_NEIGHBOURS = 8


def check_outer(m: int) -> None:
    """M ≥ 2 outer samples: a standard error needs at least two. The one check of M, made by
    ``OuterPlan.build`` and, before any work, by the commands that take M."""
    if not m >= 2:
        raise ParameterError("outer", m, "need at least 2 outer samples (M ≥ 2)")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if m * BYTES_PER_DRAW > memory:
        raise ParameterError(
            "outer", m, f"{m} outer samples need {m * BYTES_PER_DRAW / 2**30:.3g} GiB, more "
            f"than this machine's {memory / 2**30:.3g} GiB of memory",
        )  # fmt: skip


def check_seed(seed: int) -> None:
    """A seed ≥ 0 (numpy's SeedSequence takes no negative entropy)."""
    if not (isinstance(seed, int) and seed >= 0):
        raise ParameterError("seed", seed, "must be an integer ≥ 0")


def stratified_sources(n: int, m: int, seed: int) -> Tensor:
    """M source indices into range(n): each index ⌊M/n⌋ or ⌈M/n⌉ times, in random order."""
    g = generator_for(seed, Stream.SOURCES)
    reps, rest = divmod(m, n)
    idx = torch.cat([torch.arange(n).repeat(reps), torch.randperm(n, generator=g)[:rest]])
    return idx[torch.randperm(m, generator=g)]


def block_noise(
    seed: int, block: int, size: int, dim: int, stream: Stream = Stream.OUTER_NOISE
) -> Tensor:
    """ε for outer block ``block``: float64 N(0, I) from the generator (seed, ``stream``,
    block), identical for every dtype and σ (``Stream.OUTER_NOISE``: the estimate's ε)."""
    return torch.randn(size, dim, generator=generator_for(seed, stream, block), dtype=torch.float64)


def resolve_draws(draws: Draws, estimator: Estimator) -> Literal["tilted", "plain"]:
    """``auto``: the estimator's ``capabilities.default_draws``: ``tilted`` for the exact and
    near-exact ones and gram (J* right below σ*; gram sweeps its grid on them too), ``plain``
    for the paper's sub-sampled ones (as the paper ran them: their closed form A − ‖μ̂‖²,
    weighted, gains variance from the weights where it has no rare events to find); draws the
    estimator does not take (``capabilities.draws``) are refused."""
    if draws not in DRAWS:
        raise ParameterError("draws", draws, f"expected one of {', '.join(DRAWS)}")
    return cast(
        Literal["tilted", "plain"],
        resolve_option("draws", draws, estimator, estimator.capabilities.draws),
    )


@dataclass
class TiltBlock:
    """The σ-independent part of one block's tilted draws (for one pool): the uniforms that
    choose the components, each draw's K neighbours, and, with diff_k = x_k − x_n, the Gram
    matrices ⟨diff_k, diff_l⟩ (B×K×K) and ⟨z, diff_k⟩ (B×K) of the plain draw z, float64."""

    u: Tensor
    neighbours: Tensor
    gram: Tensor
    z_dot: Tensor

    @classmethod
    def build(
        cls, seed: int, block: int, plain: Tensor, x: Tensor, sources: Tensor, neighbours: Tensor
    ) -> TiltBlock:
        table = neighbours[sources, 1 : TILT_NEIGHBOURS + 1].to(x.device)
        diff = x[table].double() - x[sources].double()[:, None, :]  # B×K×D
        z = plain.to(device=x.device, dtype=torch.float64)
        u = torch.rand(
            plain.shape[0], generator=generator_for(seed, Stream.TILT, block), dtype=torch.float64
        )
        return cls(
            u=u.to(x.device),
            neighbours=table,
            gram=torch.bmm(diff, diff.transpose(1, 2)),
            z_dot=torch.bmm(diff, z[:, :, None])[:, :, 0],
        )


def tilted_noise(
    tilt: TiltBlock, plain: Tensor, x: Tensor, sources: Tensor, sigma: float
) -> tuple[Tensor, Tensor]:
    """Defensive mixture importance sampling of the noise (Hesterberg 1995), with exponentially
    tilted components: for source x_n and its K nearest neighbours x_k (``tilt``),

        q(ε) = (1 − α)·φ(ε) + α·Σ_k β_k·φ(ε − δ_k),   δ_k = (x_k − x_n)/(2σ),
        β_k ∝ exp(−‖δ_k‖²/2) = exp(−‖x_k − x_n‖²/8σ²),

    (φ the N(0, I) density, α = TILT_SHARE): component k puts x_t = x_n + σε at the midpoint of
    x_n and x_k on average, where the rare draws that carry J* below σ* live, and β_k follows
    the probability ~e^{−d_k²/8σ²} of such a draw (uniform at large σ, the nearest neighbour
    at small σ). Each draw ε = z + δ_c (z the plain draw; c from a uniform shared by every σ)
    gets the likelihood ratio

        w(ε) = φ(ε)/q(ε) = 1 / ((1 − α) + α·Σ_k β_k·exp(⟨ε, δ_k⟩ − ‖δ_k‖²/2)) ≤ 1/(1 − α),

    so E_q[w·f(ε)] = E_φ[f(ε)] for every f. ⟨ε, δ_k⟩ = ⟨z, diff_k⟩/2σ + ⟨diff_c, diff_k⟩/4σ²
    comes from the block's Gram matrices, so a σ costs O(B·(D + K²)). Returns (ε, w), float64.
    At large σ, δ → 0 and w → 1: the draws become the plain ones. ``Moments`` adds the control
    variate w − 1 (``control_variate``): on the two-point set of docs/benchmarks.md it cuts the
    variance 1.9–10× at σ ≥ 0.8, where the shifted half of the draws no longer carries J*."""
    sel, chosen, w = tilt_choice(tilt, sigma)
    eps = plain.to(device=x.device, dtype=torch.float64).clone()
    eps[sel] += (x[chosen].double() - x[sources[sel]].double()) / (2 * sigma)
    return eps, w


def tilt_choice(tilt: TiltBlock, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    """``tilted_noise``'s choice at σ: (the draws shifted, the neighbour c each is shifted
    toward, as an index of ``tilt``'s table's rows, and every draw's likelihood ratio w)."""
    two_s = 2 * sigma
    k = tilt.neighbours.shape[1]
    half_sq = torch.diagonal(tilt.gram, dim1=1, dim2=2) / (2 * two_s * two_s)
    log_beta = torch.log_softmax(-half_sq, dim=1)
    v = (tilt.u - (1 - TILT_SHARE)) / TILT_SHARE
    cdf = log_beta.exp().cumsum(dim=1)
    comp = torch.searchsorted(cdf, v.clamp(min=0)[:, None]).flatten().clamp(max=k - 1)
    tilted = v >= 0
    rows = torch.arange(comp.numel(), device=comp.device)
    dot = tilt.z_dot / two_s + tilted[:, None] * tilt.gram[rows, comp] / (two_s * two_s)
    log_mix = torch.logsumexp(dot - half_sq + log_beta, dim=1) + math.log(TILT_SHARE)
    log_q = torch.logaddexp(log_mix, torch.full_like(log_mix, math.log(1 - TILT_SHARE)))
    sel = torch.nonzero(tilted).flatten()
    return sel, tilt.neighbours[sel, comp[sel]], torch.exp(-log_q)


@dataclass
class OuterPlan:
    """The outer draws for a dataset: M sources and (for conditional runs) per-class pools.
    The draws are fixed by (data, M, seed, conditional)."""

    sources: Tensor
    groups: list[tuple[Tensor, Tensor]]  # (global indices of the class, its pool index map)
    data: Tensor | ChunkedDataset  # chunked: read per chunk (``stream.StreamedPool``)
    seed: int
    conditional: bool
    std: Tensor | None = None  # Gaussian items N(data_i, diag std_i²) (``mixture.py``)

    @classmethod
    def build(
        cls,
        data: Tensor | ChunkedDataset,
        labels: Tensor | None,
        m: int,
        seed: int,
        conditional: bool,
        std: Tensor | None = None,
    ) -> OuterPlan:
        n = len(data)
        check_outer(m)
        check_seed(seed)
        if conditional and labels is None:
            raise UserError("a conditional estimate needs labels; this dataset has none")
        if conditional:
            classes = torch.unique(labels)
            members = [torch.nonzero(labels == c).flatten() for c in classes]
        else:
            members = [torch.arange(n)]
        groups = []
        for idx in members:
            local = torch.full((n,), -1, dtype=torch.long)
            local[idx] = torch.arange(idx.numel())
            groups.append((idx, local))
        sources = stratified_sources(n, m, seed)
        return cls(sources=sources, groups=groups, data=data, seed=seed, conditional=conditional,
                   std=std)  # fmt: skip

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the data (of Gaussian items, with their stds) and, conditional, of the
        class partition: with (M, seed,
        conditional) it identifies the draws and the pools."""
        if isinstance(self.data, ChunkedDataset):  # the same, from its statistics pass
            data = self.data.summary.tensor_sha256
        else:
            data = fingerprint(self.data.detach().cpu().numpy(), "tensor")
        digest = hashlib.sha256(data.encode())
        if self.std is not None:  # Gaussian items: their stds too
            digest.update(b"std|" + fingerprint(self.std.detach().cpu().numpy(), "tensor").encode())
        if self.conditional:
            for members, _ in self.groups:
                digest.update(members.numpy().tobytes() + b"|")
        return digest.hexdigest()

    @property
    def outer(self) -> int:
        """M, the number of outer draws."""
        return self.sources.numel()

    @property
    def blocks(self) -> int:
        return math.ceil(self.sources.numel() / OUTER_BLOCK)

    def prefix(self, m: int) -> OuterPlan:
        """The plan's first m draws (m a multiple of OUTER_BLOCK, or M): each of its blocks is
        the same block of this plan (sources, noise, inner sets, tilts), so values computed on
        it are those of this plan's first m draws."""
        if m >= self.outer:
            return self
        if m % OUTER_BLOCK or m <= 0:
            raise ParameterError("outer", m, f"a prefix is whole blocks of {OUTER_BLOCK} draws")
        return dataclasses.replace(self, sources=self.sources[:m])


def tilt_group(
    plan: OuterPlan,
    block: int,
    group: int,
    pool: Pool,
    sources: Tensor,
    plain: Tensor,
    sigma: float,
    tilt_cache: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """(ε, w) of ``tilted_noise`` for the draws of outer block ``block`` whose sources (pool
    indices, on the pool's device) lie in ``group``, from their plain draws: the noise
    ``per_sample_values`` uses (the pool needs its neighbour table); ``tilt_cache`` keeps the
    block's ``TiltBlock`` for the next σ."""
    x, src_d, tilt = _tilt_block(plan, block, group, pool, sources, plain, tilt_cache)
    return tilted_noise(tilt, plain, x, src_d, sigma)


def tilt_toward(
    plan: OuterPlan,
    block: int,
    group: int,
    pool: Pool,
    sources: Tensor,
    plain: Tensor,
    sigma: float,
    tilt_cache: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """``tilt_group``'s draws as (toward, w): ε = plain + (x_c − x_s)/2σ with c = toward[b]
    (a pool index; −1 where the draw is plain), for a pool holding every row in memory (the
    grid sweep: ``Gram.grid_values``)."""
    _, _, tilt = _tilt_block(plan, block, group, pool, sources, plain, tilt_cache)
    sel, chosen, w = tilt_choice(tilt, sigma)
    toward = torch.full_like(sources, -1)
    toward[sel] = chosen
    return toward, w


def _tilt_block(
    plan: OuterPlan,
    block: int,
    group: int,
    pool: Pool,
    sources: Tensor,
    plain: Tensor,
    tilt_cache: dict | None,
) -> tuple[Tensor, Tensor, TiltBlock]:
    """(rows, sources, ``TiltBlock``) of ``tilt_group``'s draws (the block's from the cache)."""
    if pool.neighbours is None:
        raise UserError("tilted draws need the pools' neighbour tables")
    x, src_d, table = _tilt_rows(pool, pool.neighbours, sources)
    key = (block, group, pool.dtype)
    tilt = None if tilt_cache is None else tilt_cache.get(key)
    if tilt is None:
        tilt = TiltBlock.build(plan.seed, block, plain, x, src_d, table)
        if tilt_cache is not None:
            tilt_cache[key] = tilt
    return x, src_d, tilt


def block_draws(
    plan: OuterPlan,
    pools: list[Pool],
    block: int,
    sigma: float,
    draws: str,
    tilt_cache: dict | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The ε of outer block ``block`` at σ as ``per_sample_values`` draws them (float64, CPU,
    in the order of ``plan.sources``) and, ``tilted``, their likelihood ratios w (1 in a pool
    of one point; None for ``plain`` draws)."""
    m = plan.sources.numel()
    lo, hi = block * OUTER_BLOCK, min(m, (block + 1) * OUTER_BLOCK)
    plain = block_noise(plan.seed, block, hi - lo, pools[0].dim)
    if draws != "tilted":
        return plain, None
    eps, weight = plain.clone(), torch.ones(hi - lo, dtype=torch.float64)
    src = plan.sources[lo:hi]
    for g, ((_, local), pool) in enumerate(zip(plan.groups, pools, strict=True)):
        sel = torch.nonzero(local[src] >= 0).flatten()
        if sel.numel() == 0 or pool.n <= 1:
            continue
        e, w = tilt_group(plan, block, g, pool, local[src[sel]].to(pool.device), plain[sel],
                          sigma, tilt_cache)  # fmt: skip
        eps[sel], weight[sel] = e.cpu(), w.cpu()
    return eps, weight


def join_samples(first: PerSample, rest: PerSample) -> PerSample:
    """The per-sample values of two consecutive runs of draws, in order."""
    n1, n2 = first.closed.numel(), rest.closed.numel()
    weight = None
    if first.weight is not None and rest.weight is not None:
        weight = torch.cat([first.weight, rest.weight])
    return PerSample(
        closed=torch.cat([first.closed, rest.closed]),
        direct=torch.cat([first.direct, rest.direct]),
        weight=weight,
        closed_error=(n1 * first.closed_error + n2 * rest.closed_error) / (n1 + n2),
    )


def _tilt_rows(pool: Pool, neighbours: Tensor, sources: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, sources, neighbour table) for one block's tilted draws (``neighbours``: the pool's
    table): the pool's own, or, for a
    sharded pool, the gathered rows of the sources and their neighbours, renumbered into them
    (the same on every σ, so a cached ``TiltBlock`` stays valid)."""
    if (whole := pool.whole()) is not None:  # every row in memory
        return whole, sources, neighbours
    table = neighbours.to(sources.device)[sources, : TILT_NEIGHBOURS + 1]
    needed, inverse = torch.unique(table, return_inverse=True)  # column 0: the source itself
    shape = (needed.numel(), table.shape[1])
    renumbered = torch.full(shape, -1, dtype=torch.long, device=sources.device)
    renumbered[inverse[:, 0]] = inverse
    return pool.rows(needed)[0], inverse[:, 0], renumbered

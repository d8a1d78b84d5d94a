"""The outer average: M draws (x0, ε), the two forms of J*(σ), their combination and error.

Draws are defined independently of chunk sizes, thread counts and σ: the M outer samples are
cut into fixed blocks of ``OUTER_BLOCK``; block j's noise and inner random sets come from
generators seeded by (seed, j). Sources are stratified: every point is used ⌊M/N⌋ or ⌈M/N⌉
times. The same draws serve every σ of a grid, so a curve is smooth and differences between σ
(or between estimators, or between a model and the optimum) are paired.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, cast, get_args

import torch

from lossfloor.data.chunked import ChunkedDataset
from lossfloor.data.dataset import fingerprint
from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.capabilities import listed
from lossfloor.optimal.estimators import Estimator, PerSample
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES, logit_error_bound
from lossfloor.optimal.pools import Pool
from lossfloor.seeding import Stream, generator_for
from lossfloor.sigmas import same_sigma

Tensor = torch.Tensor

#: Outer samples per block: part of the definition of the draws (not a memory knob).
OUTER_BLOCK = 1024

#: The "auto" precision policy uses float64 where the fp32 logit error bound exceeds this. A
#: logit error δ moves J* by about δ·J* at worst; on Fashion-MNIST the measured fp32 error is
#: ~100× below the bound (docs/benchmarks.md), so 0.1 keeps J* within ~1e-3 relative.
AUTO_LOGIT_TOLERANCE = 0.1

#: The σ a grid may hold. Beyond it σ² or 1/σ² (times the data's scale) leaves float64's
#: range, and J* is the data variance (σ ≥ 1e100) or 0 (σ ≤ 1e-100) to every digit anyway.
SIGMA_RANGE = (1e-100, 1e100)

#: Bytes per outer draw held at once (source index, both forms in float64): M is checked
#: against the machine's memory before any work.
BYTES_PER_DRAW = 24

#: The "auto" policy also uses float64 for data whose centred squared norms exceed this: their
#: sums of squares come near float32's maximum (3.4e38) and lose digits or overflow.
FLOAT32_MAX_SQ_NORM = 1e30

#: A point is ``resolved`` where at least this many draws carry its value (``effective_draws``):
#: on two points in 16 dims (M = 8000, plain draws) ESS ≈ 1–3 at σ = 0.6, where s/√M was 2–7×
#: too small, and ≈ 25–35 at σ = 0.8, where the values were within 1–2 s of the exact one.
MIN_EFFECTIVE_DRAWS = 30.0

#: The combination leaves the closed form out where its rounding bound exceeds this share of
#: its standard error and it disagrees with the direct form by more than FORMS_AGREE standard
#: errors of their difference (tilted draws, ``Moments.from_samples``).
CLOSED_ROUNDING_SHARE = 0.1
FORMS_AGREE = 2.0

#: The options of the outer average, as types (``estimate_curve``'s signature) and as tuples.
Form = Literal["auto", "closed", "direct", "combined"]
Draws = Literal["auto", "tilted", "plain"]
Precision = Literal["auto", "float32", "float64"]
FORMS: tuple[Form, ...] = get_args(Form)
DRAWS: tuple[Draws, ...] = get_args(Draws)

#: The tilted draws' mixture: the share α of draws shifted toward a neighbour, and how many of
#: the source's nearest neighbours the shifted components cover.
TILT_SHARE = 0.5
TILT_NEIGHBOURS = 8
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


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


def check_sigmas(sigmas: Sequence[float]) -> None:
    """A non-empty σ grid, each σ finite, within SIGMA_RANGE, and no σ twice (``same_sigma``):
    the one check of a grid, made before any work by ``estimate_curve`` and ``diagnose``."""
    if not sigmas:
        raise ParameterError("sigmas", list(sigmas), "the σ list is empty; give at least one σ > 0")
    lo, hi = SIGMA_RANGE
    for s in sigmas:
        if math.isnan(s):
            raise ParameterError("sigmas", s, "σ is not a number; give each σ as a number > 0")
        if not s > 0:
            raise ParameterError("sigmas", s, "every σ must be > 0")
        if not lo <= s <= hi:
            raise ParameterError(
                "sigmas", s, f"σ must lie in [{lo:g}, {hi:g}] (beyond it J* is 0 or the data "
                "variance to every digit, and σ² leaves the float range)",
            )  # fmt: skip
    twice = [s for i, s in enumerate(sigmas) if any(same_sigma(s, t) for t in sigmas[:i])]
    if twice:
        raise ParameterError("sigmas", twice[0], "this σ appears twice in the list")


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


def block_noise(seed: int, block: int, size: int, dim: int) -> Tensor:
    """ε for outer block ``block``: float64 N(0, I), identical for every dtype and σ."""
    return torch.randn(
        size, dim, generator=generator_for(seed, Stream.OUTER_NOISE, block), dtype=torch.float64
    )


def resolve_draws(draws: Draws, estimator: Estimator) -> Literal["tilted", "plain"]:
    """``auto``: the estimator's ``capabilities.default_draws``: ``tilted`` for the exact and
    near-exact ones (J* right below σ*), ``plain`` for the paper's sub-sampled ones (as the
    paper ran them: their closed form A − ‖μ̂‖², weighted, gains variance from the weights where
    it has no rare events to find) and for gram (its grid sweep takes plain draws); draws the
    estimator does not take (``capabilities.draws``) are refused."""
    if draws not in DRAWS:
        raise ParameterError("draws", draws, f"expected one of {', '.join(DRAWS)}")
    return cast(
        Literal["tilted", "plain"],
        _resolve("draws", draws, estimator, estimator.capabilities.draws),
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
    eps = plain.to(device=x.device, dtype=torch.float64).clone()
    sel = torch.nonzero(tilted).flatten()
    chosen = tilt.neighbours[sel, comp[sel]]
    eps[sel] += (x[chosen].double() - x[sources[sel]].double()) / two_s
    return eps, torch.exp(-log_q)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """(mean, s/√M) of M per-sample values (the i.i.d. formula; stratified sources make it
    conservative)."""
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


def control_variate(values: Tensor, weight: Tensor) -> Tensor:
    """v − β̂·(w − 1), β̂ = Cov(v, w)/Var(w), for per-draw values v on importance-sampled draws
    with likelihood ratios w: the regression estimator with the control w − 1, whose mean is
    exactly 0 (E_q[φ/q] = 1; Owen & Zhou 2000, mixture importance sampling with the mixture's
    density ratios as control variates). Its mean is v̄ − β̂(w̄ − 1), unbiased up to O(1/M), and
    its variance per draw Var(v)·(1 − ρ²(v, w)): never above plain IS (β = 0) nor the
    self-normalised Σwf/Σw (whose linearisation is β = J*), so s/√M of the returned values is
    the regression estimator's standard error (β̂'s own noise adds O(1/M) relative). The tilted
    w ≤ 1/(1 − α) is bounded, so the control cannot fit away an isolated large draw (a rare
    event) and hide it from s. ``values`` unchanged where w is constant."""
    h = weight.double() - 1.0
    hc = h - h.mean()
    ss = hc.pow(2).sum().item()
    if not ss > 1e-300:
        return values
    v = values.double()
    beta = ((v - v.mean()) * hc).sum().item() / ss
    return v - beta * h


def effective_draws(values: Tensor) -> float:
    """(Σ v)² / Σ v² of M per-draw values v ≥ 0: M when every draw carries the same share of
    the mean, 1 when one draw carries all of it, 0 when all are 0. Where it is small the mean
    rests on a few draws and s/√M says little about the error (a rare event the draws missed
    leaves no trace in s)."""
    v = values.double()
    total_sq = v.pow(2).sum().item()
    return v.sum().item() ** 2 / total_sq if total_sq > 0 else 0.0


def base_dtype(precision: str) -> torch.dtype:
    """The dtype a precision policy works in by default: float64 for ``float64``, else float32
    (``auto`` switches to float64 per σ where ``choose_dtype`` says so)."""
    if precision not in PRECISIONS:
        raise ParameterError("precision", precision, f"expected one of {', '.join(PRECISIONS)}")
    return torch.float64 if precision == "float64" else torch.float32


@dataclass
class Moments:
    """The outer average of one σ: both forms, their combination and errors, and how many draws
    carry the value (``ess``)."""

    closed: float
    closed_stderr: float
    direct: float
    direct_stderr: float
    combined: float
    combined_stderr: float
    weight_closed: float
    m: int
    ess: float

    @classmethod
    def from_samples(cls, s: PerSample) -> Moments:
        """a* = (V_d − C)/(V_c + V_d − 2C) minimises Var(a·closed + (1−a)·direct); it is clipped
        to [0, 1], so the combination is a convex one and its mean lies between the two forms'
        (an estimated a outside [0, 1] extrapolates, and can give J* < 0). On tilted draws each
        form is first ``control_variate``-adjusted with the draws' likelihood ratios, and the
        closed form is left out (a = 0) where its rounding bound ``closed_error`` exceeds
        CLOSED_ROUNDING_SHARE of its standard error and the two forms, whose difference has
        mean 0 in exact arithmetic, differ by more than FORMS_AGREE of its standard error (the
        control removes the noise that hid the rounding: at σ = 0.3 on the two-point set,
        float32, the closed form is 1.1e-8 low against J* = 7.8e-14 with a stderr of 2.5e-15;
        the bound is a worst case, ~100× the error measured on Fashion-MNIST, so where the
        forms agree the closed form stays). ``ess`` is
        ``effective_draws`` of the direct form (as drawn, w·‖x0 − μ‖²/D)."""
        c, d = s.closed.double(), s.direct.double()
        ess = effective_draws(d)
        if s.weight is not None:
            c, d = control_variate(c, s.weight), control_variate(d, s.weight)
        m = c.numel()
        vc, vd = c.var().item(), d.var().item()
        cov = ((c - c.mean()) * (d - d.mean())).sum().item() / (m - 1)
        denom = vc + vd - 2 * cov
        a = min(1.0, max(0.0, (vd - cov) / denom)) if denom > 1e-300 else 0.5
        closed, closed_se = mean_and_stderr(c)
        direct, direct_se = mean_and_stderr(d)
        if s.closed_error > CLOSED_ROUNDING_SHARE * closed_se:
            gap, gap_se = mean_and_stderr(c - d)
            if abs(gap) > FORMS_AGREE * gap_se:
                a = 0.0  # the closed form's rounding is a bias beyond its stderr
        combined, combined_se = mean_and_stderr(a * c + (1 - a) * d)
        return cls(closed, closed_se, direct, direct_se, combined, combined_se, a, m, ess)

    def pick(self, form: str) -> tuple[float, float]:
        """(value, stderr) of ``form`` ∈ closed | direct | combined."""
        return {
            "closed": (self.closed, self.closed_stderr),
            "direct": (self.direct, self.direct_stderr),
            "combined": (self.combined, self.combined_stderr),
        }[form]


def resolve_form(form: Form, estimator: Estimator) -> Literal["closed", "direct", "combined"]:
    """``auto``: the estimator's ``capabilities.default_form``: the min-variance combination
    for the exact (and near-exact stratified) posterior and for gram (both forms unbiased); for
    the sub-sampled estimators the two forms are biased in opposite directions, so the paper's
    A − ‖μ̂‖²; forms the estimator does not report (``capabilities.forms``) are refused."""
    if form not in FORMS:
        raise ParameterError("form", form, f"expected one of {', '.join(FORMS)}")
    return cast(
        Literal["closed", "direct", "combined"],
        _resolve("form", form, estimator, estimator.capabilities.forms),
    )


def _resolve(param: str, value: str, estimator: Estimator, able: frozenset[str]) -> str:
    """``value``, or the estimator's default ``param`` for ``auto``; refused where ``able``
    lacks it."""
    caps = estimator.capabilities
    if value == "auto":
        return caps.default_draws if param == "draws" else caps.default_form
    if value not in able:
        reason = (
            f"the {estimator.name} estimator does not take it ({param}: {listed(sorted(able))})"
        )
        raise ParameterError(param, value, reason)
    return value


def choose_dtype(precision: str, pools: Iterable[Pool], sigma: float) -> torch.dtype:
    """float32 / float64, or ``auto``: float64 where the fp32 logit error bound at σ exceeds
    AUTO_LOGIT_TOLERANCE (small σ on data with large norms) or the squared norms of the data
    or of a typical query x0 + σε (R² + D·σ²) exceed FLOAT32_MAX_SQ_NORM (large data or huge
    σ), float32 elsewhere."""
    if precision != "auto":
        return base_dtype(precision)
    if max(p.max_sq + p.dim * sigma * sigma for p in pools) > FLOAT32_MAX_SQ_NORM:
        return torch.float64
    worst = max(logit_error_bound(p.max_sq, p.dim, sigma, torch.float32) for p in pools)
    return torch.float64 if worst > AUTO_LOGIT_TOLERANCE else torch.float32


@dataclass
class OuterPlan:
    """The outer draws for a dataset: M sources and (for conditional runs) per-class pools.
    The draws are fixed by (data, M, seed, conditional)."""

    sources: Tensor
    groups: list[tuple[Tensor, Tensor]]  # (global indices of the class, its pool index map)
    data: Tensor | ChunkedDataset  # chunked: read per chunk (``stream.StreamedPool``)
    seed: int
    conditional: bool

    @classmethod
    def build(
        cls,
        data: Tensor | ChunkedDataset,
        labels: Tensor | None,
        m: int,
        seed: int,
        conditional: bool,
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
        return cls(sources=sources, groups=groups, data=data, seed=seed, conditional=conditional)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the data and, conditional, of the class partition: with (M, seed,
        conditional) it identifies the draws and the pools."""
        if isinstance(self.data, ChunkedDataset):  # the same, from its statistics pass
            data = self.data.summary.tensor_sha256
        else:
            data = fingerprint(self.data.detach().cpu().numpy(), "tensor")
        digest = hashlib.sha256(data.encode())
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
    """Both forms for every outer sample at σ (float64, in the order of ``plan.sources``).

    ``draws``: ``plain`` ε ~ N(0, I), or ``tilted`` (``tilted_noise``; the pools need their
    neighbour tables), whose values are the unbiased terms w·direct and A/D + w·(closed − A/D)
    (w the likelihood ratio, returned as ``weight``; 1 in a pool of one point): their means
    estimate J* like the plain draws'. ``tilt_cache`` keeps each block's ``TiltBlock`` for the
    next σ. ``first_block`` > 0: only the draws from that block on (the values of the rest,
    in order)."""
    m = plan.sources.numel()
    dim = pools[0].dim
    start = first_block * OUTER_BLOCK
    closed = torch.empty(m - start, dtype=torch.float64)
    direct = torch.empty(m - start, dtype=torch.float64)
    ratio = torch.ones(m - start, dtype=torch.float64) if draws == "tilted" else None
    rounding = 0.0  # tilted: Σ w·(the closed form's rounding bound) over the draws
    for j in range(first_block, plan.blocks):
        lo, hi = j * OUTER_BLOCK, min(m, (j + 1) * OUTER_BLOCK)
        src = plan.sources[lo:hi]
        noise = block_noise(plan.seed, j, hi - lo, dim)
        inner_g = generator_for(plan.seed, Stream.INNER, j)
        for g, ((_, local), pool) in enumerate(zip(plan.groups, pools, strict=True)):
            sel = torch.nonzero(local[src] >= 0).flatten() if len(plan.groups) > 1 else None
            s_local = local[src] if sel is None else local[src[sel]]
            eps = noise if sel is None else noise[sel]
            if s_local.numel() == 0:
                continue
            weight = None
            if draws == "tilted" and pool.n > 1:
                eps, weight = tilt_group(plan, j, g, pool, s_local.to(device), eps, sigma,
                                         tilt_cache)  # fmt: skip
            out = estimator(
                pool,
                s_local.to(device),
                eps.to(device=device, dtype=dtype),
                sigma,
                inner_g,
                tile_bytes,
            )
            if weight is not None:
                w = weight.to(out.direct.device)
                rounding += (w * closed_rounding(pool, sigma, dtype, out.closed)).sum().item()
                base = pool.a / pool.dim
                out = PerSample(closed=base + w * (out.closed - base), direct=w * out.direct)
            where = slice(lo - start, hi - start) if sel is None else sel + (lo - start)
            closed[where] = out.closed.cpu()
            direct[where] = out.direct.cpu()
            if weight is not None:
                ratio[where] = weight.cpu()
        if on_block is not None:
            on_block()
    if ratio is None:
        return PerSample(closed=closed, direct=direct)
    return PerSample(
        closed=closed, direct=direct, weight=ratio, closed_error=rounding / (m - start)
    )


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
    if pool.neighbours is None:
        raise UserError("tilted draws need the pools' neighbour tables")
    x, src_d, table = _tilt_rows(pool, sources)
    key = (block, group, pool.dtype)
    tilt = None if tilt_cache is None else tilt_cache.get(key)
    if tilt is None:
        tilt = TiltBlock.build(plan.seed, block, plain, x, src_d, table)
        if tilt_cache is not None:
            tilt_cache[key] = tilt
    return tilted_noise(tilt, plain, x, src_d, sigma)


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


def outer_for(m: int, value: float, stderr: float, target: float) -> float:
    """M·(s/(target·J))²: the draws for a relative standard error ``target`` where M draws
    gave J ± s (s ∝ 1/√M); ∞ where J ≤ 0 (no value to be relative to)."""
    if not value > 0:
        return math.inf
    return m * (stderr / (target * value)) ** 2


def closed_rounding(pool: Pool, sigma: float, dtype: torch.dtype, closed: Tensor) -> Tensor:
    """Bounds on the rounding errors of closed-form values (A − ‖μ‖²)/D computed in ``dtype``
    (``closed``, one per draw, float64): the weights' relative error δ
    (``kernel.logit_error_bound``) moves μ by e ≤ 4δ·R, and μ's own rounding by 2u·‖μ‖ (R² =
    max‖x‖², u the unit round-off), so ‖μ‖² by ≤ 2‖μ‖·e + e². Where J* is far below A·u,
    A − ‖μ‖² is a difference of nearly equal numbers and this error, systematic for a σ, is
    not in the closed form's standard error; at large σ, ‖μ‖ → 0 and so does the bound."""
    u = torch.finfo(dtype).eps / 2
    delta = logit_error_bound(pool.max_sq, pool.dim, sigma, dtype)
    norm = (pool.a - pool.dim * closed.double()).clamp(min=0).sqrt()  # ‖μ‖
    e = 4 * delta * math.sqrt(pool.max_sq) + 2 * u * norm
    return (2 * norm * e + e * e) / pool.dim


def _tilt_rows(pool: Pool, sources: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, sources, neighbour table) for one block's tilted draws: the pool's own, or, for a
    sharded pool, the gathered rows of the sources and their neighbours, renumbered into them
    (the same on every σ, so a cached ``TiltBlock`` stays valid)."""
    if (whole := pool.whole()) is not None:  # every row in memory
        return whole, sources, pool.neighbours
    table = pool.neighbours.to(sources.device)[sources, : TILT_NEIGHBOURS + 1]
    needed, inverse = torch.unique(table, return_inverse=True)  # column 0: the source itself
    shape = (needed.numel(), table.shape[1])
    renumbered = torch.full(shape, -1, dtype=torch.long, device=sources.device)
    renumbered[inverse[:, 0]] = inverse
    return pool.rows(needed)[0], inverse[:, 0], renumbered

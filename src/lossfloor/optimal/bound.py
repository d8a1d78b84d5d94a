"""A rigorous upper bound on J*(σ) from the nearest-neighbour index: the error of the
nearest-point denoiser, so that below σ* (where J* rests on draws too rare to resolve) a curve
says how small J* is at most.

J* is the least error of any denoiser; the nearest-point one, D(x_t) = the data point nearest
x_t, errs given source x_n only where x_t = x_n + σε lies closer to some x_m, which happens with
probability P(⟨ε, (x_m − x_n)/d_nm⟩ > d_nm/2σ) = Q(d_nm/2σ) (Q the standard normal tail), and
then costs d_nm² = ‖x_n − x_m‖². By the union bound, per element,

    J*(σ) ≤ (1/(N·D))·Σ_n Σ_{m≠n} f(d_nm),   f(d) = d²·Q(d/2σ)

(class-conditional: the sum runs over each source's class). For each point the k nearest
pairs of the index are summed exactly and the N_c − 1 − k others bounded by their number times
sup f over [d_k, 2R] (R² = max‖x_n − x̄‖²). f(d) = 4σ²·g(d/2σ), g(u) = u²Q(u), is unimodal:
g'(u) = u·(2Q(u) − u·φ(u)), and h = 2Q − uφ has h' = φ·(u² − 3), so h falls from 1 at 0 to
below 0 by √3, then rises to 0 from below; g rises up to the one root u* ≈ 1.19 of h
(``u_star``) and falls after it. The sup of f over [a, b] is therefore f at the point of
[a, b] nearest 2σ·u*.

The bound is rigorous up to the rounding it accounts for: each distance, computed from the
pool's rows (the centred data rounded to the pool's dtype) or the data's, is widened to an
interval that holds the exact distance between the data points (``from_index``), the
k-th distance is lowered by the index's ranking error, and the sum's logarithm is raised by a
margin for float64's rounding of Q and of the sum (``log_value``). It is computed in log space
(``scipy.special.log_ndtr``): the value is 0.0 only where the bound is below float64's smallest
positive number (~4.9e-324).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from lossfloor.optimal.draws import OuterPlan
from lossfloor.optimal.kernel import logit_error_bound
from lossfloor.optimal.pools import Pool

Tensor = torch.Tensor

#: J* counts as memorised at σ where its upper bound is at most this share of the data variance.
MEMORISED_SHARE = 1e-6

#: The bound needs this many nearest neighbours per point (the index is built with at least as
#: many where a curve uses one): on digits (N = 1797) with 8 the bound at σ = 0.157 is 40% above
#: its all-pairs value (the tail's share), with 16 within 0.5%, with 32 within 0.01%.
BOUND_NEIGHBOURS = 32

#: Bytes of float64 rows (sources and their neighbours) read at once for the distances.
ROW_BYTES = 64 * 2**20

_U64 = float(np.finfo(np.float64).eps) / 2


@cache
def u_star() -> float:
    """The maximiser of u²·Q(u) on u ≥ 0: the root of 2Q(u) = u·φ(u) in (0, √3), to 1e-15 (an
    error δ there moves the maximum by O(δ²) relative, far below ``margin``)."""
    from scipy.optimize import brentq
    from scipy.special import ndtr

    def h(u: float) -> float:
        return 2 * ndtr(-u) - u * math.exp(-u * u / 2) / math.sqrt(2 * math.pi)

    return float(brentq(h, 0.5, math.sqrt(3), xtol=1e-15, rtol=8 * _U64))


def log_pair_term(d: np.ndarray, sigma: float) -> np.ndarray:
    """ln f(d) = ln(d²·Q(d/2σ)), elementwise (−inf at d = 0)."""
    from scipy.special import log_ndtr

    with np.errstate(divide="ignore"):
        return 2 * np.log(d) + log_ndtr(-d / (2 * sigma))


@dataclass(frozen=True)
class NearestPointBound:
    """J*(σ) ≤ (1/(N·D))·[Σ_pairs sup_{d ∈ [near_lo, near_hi]} f(d) + Σ_points tail_count ·
    sup_{d ∈ [tail_lo, tail_hi]} f(d)] (module docstring; the sup over [a, b] is f at the point
    of [a, b] nearest the peak 2σ·u*): each listed pair's distance as an
    interval holding the exact one, and per point the number of pairs beyond its listed
    neighbours with an interval holding their distances (float64 arrays)."""

    near_lo: np.ndarray
    near_hi: np.ndarray
    tail_lo: np.ndarray
    tail_hi: np.ndarray
    tail_count: np.ndarray
    n: int
    dim: int

    @classmethod
    def from_index(
        cls, plan: OuterPlan, pools: list[Pool], tables: list[Tensor], k: int | None = None
    ) -> NearestPointBound | None:
        """The bound from the plan's data, each pool (the whole set, or each class) and its
        neighbour table (``neighbours.neighbour_tables``, built on these pools), using the first
        ``k`` neighbours (default: all listed); None unless every point has its row (every
        point a source of the draws: M ≥ N). On K > 1 processes every process calls it.

        The distances are of the pool's rows where it holds them all (the centred data rounded
        to its dtype, unit round-off u: each within (u + 2u₆₄)·R of the exact centred point, so
        distances within e₀ = 2(u + 2u₆₄)·R of the data's), else of the data in memory (e₀ = 0)
        or the rows read (streamed data, as a pool's); the differences are rounded in the rows'
        dtype (relative u_r) and their norms taken in float64, so each distance d̂ is within
        (u_r + (D + 3)·u₆₄)·d̂ + e₀ of the data's. An unlisted point ranks below the k-th in the
        index's scores, whose rounding is at most δ (``kernel.logit_error_bound`` at σ = 1, the
        index's dtype), so its squared distance is at least the k-th's − 4δ."""
        if any(bool((t[:, 0] < 0).any()) for t in tables):
            return None
        dim = pools[0].dim
        near_lo, near_hi, tail_lo, tail_hi, tail_count = [], [], [], [], []
        for (members, _), pool, table in zip(plan.groups, pools, tables, strict=True):
            table = table[:, : (table.shape[1] if k is None else k + 1)]
            if table.shape[1] == 1:  # a pool of one point: no pairs
                continue
            rank = 4 * logit_error_bound(pool.max_sq, dim, 1.0, pool.dtype)
            rows, e0 = _row_reader(plan, members, pool)
            d, unit = _neighbour_distances(rows, table, dim)
            rel = unit + (dim + 3) * _U64  # the rows' differences in their dtype, norms in float64
            near_lo.append(np.maximum(d * (1 - rel) - e0, 0.0).ravel())
            near_hi.append((d * (1 + rel) + e0).ravel())
            kth = np.maximum((d[:, -1] * (1 - rel)) ** 2 - rank, 0.0)
            tail_lo.append(np.maximum(np.sqrt(kth) - e0, 0.0))
            tail_hi.append(np.full(pool.n, 2 * math.sqrt(pool.max_sq) * (1 + (dim + 3) * _U64)))
            tail_count.append(np.full(pool.n, float(pool.n - table.shape[1])))

        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0)

        return cls(
            near_lo=joined(near_lo),
            near_hi=joined(near_hi),
            tail_lo=joined(tail_lo),
            tail_hi=joined(tail_hi),
            tail_count=joined(tail_count),
            n=sum(p.n for p in pools),
            dim=dim,
        )

    def log_value(self, sigma: float) -> float:
        """ln of the bound at σ (−inf where there are no pairs: J* = 0), raised by a margin for
        float64's rounding: ln Q(u) ≈ −u²/2 is computed to a few u₆₄ relative, so 8·u₆₄·u² for
        u = the largest distance bound (the diameter 2R)/2σ, plus 1e-12 for the sums."""
        from scipy.special import logsumexp

        peak = 2 * sigma * u_star()
        d = np.concatenate([np.clip(peak, self.near_lo, self.near_hi),
                            np.clip(peak, self.tail_lo, self.tail_hi)])  # fmt: skip
        with np.errstate(divide="ignore"):
            counts = np.concatenate([np.zeros(self.near_lo.size), np.log(self.tail_count)])
        terms = log_pair_term(d, sigma) + counts
        if not np.isfinite(terms).any():
            return -math.inf
        diameter = max(float(self.near_hi.max(initial=0)), float(self.tail_hi.max(initial=0)))
        u = diameter / (2 * sigma)
        margin = 8 * _U64 * u * u + 1e-12
        return float(logsumexp(terms)) - math.log(self.n * self.dim) + margin

    def __call__(self, sigma: float) -> float:
        """The bound at σ, per element (0.0 only below float64's smallest positive number)."""
        return math.exp(self.log_value(sigma))


def _row_reader(
    plan: OuterPlan, members: Tensor, pool: Pool
) -> tuple[Callable[[Tensor], Tensor], float]:
    """(the rows of pool indices, the most their distances may differ from the data's beyond
    the rounding of their differences): the pool's own rows where it holds every one (on its
    device; e₀ = 2(u + 2u₆₄)·R), else the data in memory (0), else the pool's rows read."""
    e0 = 2 * (torch.finfo(pool.dtype).eps / 2 + 2 * _U64) * math.sqrt(pool.max_sq)
    if pool.whole() is None and isinstance(plan.data, Tensor):
        x = plan.data.reshape(len(plan.data), -1)
        return lambda i: x[members[i.to(members.device)]], 0.0
    return lambda i: pool.rows(i.to(pool.device))[0], e0


def _neighbour_distances(
    rows: Callable[[Tensor], Tensor], table: Tensor, dim: int
) -> tuple[np.ndarray, float]:
    """(‖x_n − x_m‖ for every point n of a pool and its listed neighbours m (n×k), the unit
    round-off of the rows' dtype): ``rows`` gives the rows (dim elements) of pool indices,
    ROW_BYTES of them at a time; the differences in their dtype, the norms in float64."""
    n, k = table.shape[0], table.shape[1] - 1
    step = max(1, ROW_BYTES // ((k + 1) * dim * 8))
    out, unit = np.empty((n, k)), _U64
    for lo in range(0, n, step):
        idx = table[lo : lo + step]
        x = rows(idx.flatten()).view(idx.shape[0], k + 1, dim)
        unit = max(unit, torch.finfo(x.dtype).eps / 2)
        diff = x[:, 1:] - x[:, :1]
        norm = torch.linalg.vector_norm(diff, dim=2, dtype=torch.float64)
        out[lo : lo + idx.shape[0]] = norm.cpu().numpy()
    return out, unit

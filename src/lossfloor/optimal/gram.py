"""The ``gram`` estimator: the exact posterior weights of every σ of a grid from two Gram
products shared by the grid; the source's term exactly and the rest from a weight-proportional
sample (docs/benchmarks.md, issue 8).

For an outer draw x_t = x0 + σε (x0 = x_s, centred data) the kernel's logits are

    l_n(σ) = (x_t·x_n − ‖x_n‖²/2)/σ² = (g_n + σ·e_n − ‖x_n‖²/2)/σ²,   g = x0·X^T, e = ε·X^T,

so the two products g and e (one GEMM each, B×N×D) serve every σ of the grid, and each σ costs
only elementwise passes over B×N: the weights w = softmax(l) are exact, normaliser included.
Split the posterior into the source s (weight w_s) and the rest R (mass m_R = 1 − w_s), and
draw L = ``inner`` points j ~ w_n/m_R from R (iid, by inverting the cumulative weights):

    μ = w_s·x0 + m_R·E_R[x],   δ = μ − x0 = m_R·E_R[u],   u_n = x_n − x0 (u_s = 0),

    ‖μ‖² ≈ w_s²‖x0‖² + 2·w_s·m_R·x0·x̄ + m_R²·(‖Σ_j x_j‖² − Σ_j ‖x_j‖²)/(L(L−1)),
    ‖δ‖² ≈ m_R²·(‖Σ_j u_j‖² − Σ_j ‖u_j‖²)/(L(L−1)),

the last terms the U-statistics of ‖E_R[x]‖² and ‖E_R[u]‖². Then closed = (A − ‖μ‖²)/D and
direct = ‖δ‖²/D are unbiased per draw: no ratio bias (the normaliser is exact), no truncation
(R is sampled, not dropped); their sampling variance is O(m_R²/L), on top of the outer draws'.
Where the posterior sits on the source (small σ) m_R → 0 and the values are full's; where a
few points share it (the rare draws that carry J* below σ*) the draws find them in proportion.

Cost per σ: the passes over B×N (logits, exp, a sum and the cumulative sum for the draws)
instead of ``full``'s two GEMMs, plus L gathered rows per draw; the two products are computed
once per block of draws for the whole grid (``grid_values``). A single σ (``__call__``: tilted
draws, adaptive sizes, conditional pools) computes them for that σ alone, at about ``full``'s
cost, and gives the same values bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lossfloor.errors import ParameterError
from lossfloor.optimal.estimators import ESTIMATORS, Estimator, PerSample, Pool
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES

Tensor = torch.Tensor

#: Draws per Gram product (its GEMM) and per elementwise pass (B×N stays in cache).
GRAM_ROWS = 256


def _weights(logits: Tensor, scale: float) -> Tensor:
    """exp(scale·(l − max l)) per row, in place, unnormalised, as 2^(scale·log₂e·(l − max l))
    (exp2 is the faster kernel). Exponents below log₂(tiny) + 1 of the dtype are raised to it:
    weights under 2·tiny (2^{−125} of the largest in float32) would be subnormal (exp's slow
    path), and together they weigh at most 2·N·tiny."""
    floor = math.log2(torch.finfo(logits.dtype).tiny) + 1.0
    top = logits.amax(dim=1, keepdim=True)
    return logits.sub_(top).mul_(scale * math.log2(math.e)).clamp_(min=floor).exp2_()


@ESTIMATORS.register("gram")
@dataclass(frozen=True, kw_only=True)
class Gram(Estimator):
    """Exact weights from shared Gram products; the source exactly and ``inner``
    weight-proportional draws of the rest (module docstring). ``rows`` draws per elementwise
    pass (a cache-sized B×N)."""

    name: ClassVar[str] = "gram"
    inner: int = 32
    rows: int = 16

    def __post_init__(self) -> None:
        if not self.inner >= 2:
            raise ParameterError("inner", self.inner, "the sample of the rest needs ≥ 2 draws")
        if not self.rows >= 1:
            raise ParameterError("rows", self.rows, "must be ≥ 1")

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "inner": self.inner, "rows": self.rows}

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        """μ̂ = w_s·x_s + m_R·(the mean of the L draws from R): unbiased for μ."""
        inv = 1.0 / (sigma * sigma)
        out = []
        for lo in range(0, queries.shape[0], self.rows):
            q = queries[lo : lo + self.rows]
            w = _weights(q @ pool.x.T - 0.5 * pool.sq, inv)
            draws = 1.0 - torch.rand(q.shape[0], self.inner, generator=generator)
            src = sources[lo : lo + self.rows]
            own, rest_mass, cum = self._split(w, src)
            mu = own[:, None] * pool.x[src]
            if cum is not None:
                pick = self._draw(cum, draws.to(q.device, w.dtype))
                mu += rest_mass[:, None] * F.embedding_bag(pick, pool.x, mode="mean")
            out.append(mu)
        return torch.cat(out)

    def __call__(self, pool, sources, noise, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES):
        return self.grid_values(pool, sources, noise, [sigma], [generator])[0]

    def grid_values(
        self,
        pool: Pool,
        sources: Tensor,
        noise: Tensor,
        sigmas: Sequence[float],
        generators: Sequence[torch.Generator],
    ) -> list[PerSample]:
        """Per-sample values at each σ of ``sigmas`` for x_t = x0[sources] + σ·noise, from one
        pair of Gram products per GRAM_ROWS draws; ``generators[i]`` draws σ_i's samples."""
        b, d = noise.shape
        draws = [
            1.0 - torch.rand(b, self.inner, generator=g).to(noise.device, noise.dtype)
            for g in generators
        ]
        closed = [torch.empty(b, dtype=torch.float64, device=noise.device) for _ in sigmas]
        direct = [torch.empty_like(c) for c in closed]
        half_sq = 0.5 * pool.sq
        for lo in range(0, b, GRAM_ROWS):
            x0, sq0 = pool.rows(sources[lo : lo + GRAM_ROWS])
            g_all = x0 @ pool.x.T
            e_all = noise[lo : lo + GRAM_ROWS] @ pool.x.T
            for s0 in range(0, x0.shape[0], self.rows):
                at = slice(lo + s0, lo + s0 + self.rows)
                g, e = g_all[s0 : s0 + self.rows], e_all[s0 : s0 + self.rows]
                x, sq = x0[s0 : s0 + self.rows], sq0[s0 : s0 + self.rows].double()
                a = g - half_sq
                buf = torch.empty_like(a)
                for i, sigma in enumerate(sigmas):
                    w = _weights(torch.add(a, e, alpha=sigma, out=buf), 1.0 / sigma**2)
                    c, dd = self._forms(pool, w, sources[at], x, sq, draws[i][at])
                    closed[i][at], direct[i][at] = c / d, dd / d
        return [PerSample(closed=c, direct=dd) for c, dd in zip(closed, direct, strict=True)]

    def _split(self, w: Tensor, src: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(each row's normalised weight at its source column ``src``, m_R, the cumulative
        weights of R per row, or None where no row has mass left in R) of the unnormalised
        weights ``w`` (B×N, ``_weights``); the source entries of ``w`` are set to 0 in place."""
        at = torch.arange(w.shape[0], device=w.device)
        own = w[at, src]
        w[at, src] = 0.0
        rest = w.sum(dim=1)
        total = rest + own
        if not bool((rest > 0).any()):
            return own / total, rest / total, None
        return own / total, rest / total, torch.cumsum(w, dim=1)

    def _draw(self, cum: Tensor, draws: Tensor) -> Tensor:
        """L indices per row drawn ∝ the increments of ``cum`` (a row's cumulative weights),
        by inversion; ``draws`` ∈ (0, 1], so a point of weight 0 is never drawn."""
        target = draws * cum[:, -1:]
        return torch.searchsorted(cum, target).clamp_(max=cum.shape[1] - 1)

    def _forms(
        self, pool: Pool, w: Tensor, src: Tensor, x0: Tensor, sq0: Tensor, draws: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(A − ‖μ‖², ‖x0 − μ‖²) per draw (float64) from the weights ``w`` (changed in place):
        the source exactly and the draws of the rest (module docstring), ‖μ‖² from x_j and
        ‖δ‖² from u_j = x_j − x0, each with its U-statistic."""
        own, rest_mass, cum = self._split(w, src)
        x0d = x0.double()
        own = own.double()
        mu_sq = own.pow(2) * sq0  # ‖w_s·x0‖²; δ's source term is 0
        delta_sq = torch.zeros_like(mu_sq)
        if cum is None:
            return pool.a - mu_sq, delta_sq
        pick = self._draw(cum, draws)
        big = pick.shape[1]
        m = rest_mass.double()
        x_bar = F.embedding_bag(pick, pool.x, mode="mean").double()
        x_sq = pool.sq[pick].double().sum(dim=1)  # Σ_j ‖x_j‖²
        x0_bar = (x0d * x_bar).sum(dim=1)
        u_bar_sq = x_bar.pow(2).sum(dim=1) - 2.0 * x0_bar + sq0  # ‖ū‖²
        u_sq = x_sq - 2.0 * big * x0_bar + big * sq0  # Σ_j ‖x_j − x0‖²
        pairs_x = (big * big * x_bar.pow(2).sum(dim=1) - x_sq) / (big * (big - 1))
        pairs_u = (big * big * u_bar_sq - u_sq) / (big * (big - 1))
        mu_sq = mu_sq + 2.0 * m * own * x0_bar + m * m * pairs_x
        delta_sq = m * m * pairs_u
        return pool.a - mu_sq, delta_sq

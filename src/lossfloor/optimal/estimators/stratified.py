"""``stratified``: each source's nearest points exactly, plus a uniform far sample weighted by
its inverse inclusion probability N/L."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.capabilities import PLACES, Capabilities
from lossfloor.optimal.estimators.base import ESTIMATORS, Estimator
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES, Adjust
from lossfloor.optimal.pools import Pool

Tensor = torch.Tensor

#: The stratified estimator's default near stratum: the source and its 15 nearest neighbours.
STRATIFIED_NEAR = 16


@ESTIMATORS.register("stratified")
@dataclass(frozen=True, kw_only=True)
class Stratified(Estimator):
    """Stratified sampling of the posterior's sums Σ_n k_n·[x_n, 1] (k_n = exp(l_n)):

    - near stratum S_b: the query's source and its ``near`` − 1 nearest neighbours (the pool's
      neighbour table), summed exactly;
    - far stratum: a uniform sample R of L = ``inner`` of the N points without replacement
      (one per ``share`` queries: the sums are GEMMs), each point outside S_b weighted by the
      inverse of its inclusion probability, N/L (Horvitz–Thompson):

        μ̂ = (Σ_{S_b} k_n x_n + (N/L) Σ_{R∖S_b} k_n x_n) / (Σ_{S_b} k_n + (N/L) Σ_{R∖S_b} k_n).

    Numerator and denominator are unbiased for the full sums; μ̂ is a ratio estimator, with
    bias and variance O((1 − L/N)/L), so J*'s error falls ∝ 1/L. Below σ* the near stratum
    holds the whole posterior and μ̂ is exact whatever L; above it the far sample carries it.
    Through the kernel: R's keys get log-weight log(N/L), near points that fall in R the
    correction −log(N/L) (weight 1), and the near points outside R are added exactly. L = N
    is ``full`` (bitwise with ``share`` = the outer block); ``near`` = 0 is SNIS with weights.
    """

    name: ClassVar[str] = "stratified"
    capabilities: ClassVar[Capabilities] = Capabilities(
        runs_on=frozenset(PLACES),
        default_draws="tilted",
        default_form="combined",
        options=frozenset({"inner", "near", "share"}),
        needs_neighbours=True,
        adapts_inner=True,
        why_not={
            "gaussian": "its near stratum (the neighbour index of the points) and its far "
            "sample's weights are the point kernel's, not a component's per-σ keys; full is "
            "exact on them"
        },
    )
    inner: int
    near: int = 16
    share: int = 256

    def __post_init__(self) -> None:
        if not self.inner >= 1:
            raise ParameterError("inner", self.inner, "the far sample needs at least 1 point")
        if not self.near >= 0:
            raise ParameterError("near", self.near, "must be ≥ 0 (0: no near stratum)")
        if not self.share >= 1:
            raise ParameterError("share", self.share, "must be ≥ 1")

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner": self.inner,
            "near": self.near,
            "share": self.share,
        }

    @classmethod
    def defaults_for(cls, n: int) -> dict[str, Any]:
        """L = max(1, N/20) far points, min(N, STRATIFIED_NEAR) near ones."""
        return {"inner": max(1, n // 20), "near": min(n, STRATIFIED_NEAR)}

    def check(self, n: int) -> None:
        for param in ("inner", "near"):
            if getattr(self, param) > n:
                raise ParameterError(
                    param, getattr(self, param), f"exceeds the number of data points N = {n}"
                )

    @property
    def neighbours_needed(self) -> int:
        """k of the neighbour table this estimator reads (near − 1 beside the source)."""
        return max(self.near - 1, 0)

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        n, big = pool.n, self.inner
        logw = math.log(n / big)
        near = self._near_sets(pool, sources)
        means = []
        for start in range(0, queries.shape[0], self.share):
            q = queries[start : start + self.share]
            idx = torch.randperm(n, generator=generator)[:big].sort().values.to(queries.device)
            adjust, missing = None, None
            if near is not None:
                pos_of = torch.full((n,), -1, dtype=torch.long, device=queries.device)
                pos_of[idx] = torch.arange(big, device=queries.device)
                pos = pos_of[near[start : start + self.share]]
                adjust = Adjust.from_positions(pos, torch.full_like(pos, -logw, dtype=q.dtype))
                missing = pos < 0
            logw_r = torch.full((big,), logw, dtype=q.dtype, device=q.device)
            state = pool.merge(
                pool.accumulate(q, sigma, idx, None, tile_bytes, key_logw=logw_r, adjust=adjust)
            )
            if missing is not None and bool(missing.any()):
                ids = near[start : start + self.share]
                keys, sq = pool.rows(ids)  # B×near×D: the near points that are not in R
                logits = torch.bmm(keys, q[:, :, None])[:, :, 0]
                logits.sub_(0.5 * sq).mul_(1.0 / (sigma * sigma))
                state.add_batched(logits.masked_fill_(~missing, -math.inf), keys)
            means.append(state.mean())
        return torch.cat(means)

    def _near_sets(self, pool: Pool, sources: Tensor) -> Tensor | None:
        """B×near pool indices of each query's near stratum, or None when it is empty."""
        if self.near == 0:
            return None
        if pool.neighbours is None or pool.neighbours.shape[1] < self.near:
            raise UserError(
                f"the stratified estimator needs each source's {self.near - 1} nearest "
                "neighbours; build the pool's index with neighbours.neighbour_tables"
            )
        table = pool.neighbours.to(sources.device)[sources, : self.near]
        if bool((table < 0).any()):
            raise UserError("the neighbour index does not cover these sources")
        return table

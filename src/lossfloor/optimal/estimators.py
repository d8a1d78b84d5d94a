"""Estimators of the posterior mean μ(x_t) = E[x0 | x_t] of an empirical dataset
(docs/method.md §3).

All of them are softmaxes of the one kernel (``kernel.py``) over different inner sets:

- ``full``  all N points: the exact posterior.
- ``snis``  L random points (self-normalised importance sampling).
- ``dol``   the source x0 that produced x_t plus L−1 random points.
- ``cdol``  as ``dol`` with the source's kernel weight divided by C (reconstructed):
            μ = (k_s/C·x_s + Σ_{j∈R} k_j x_j) / (k_s/C + Σ_{j∈R} k_j).
            C = 1 is DOL; C = ∞ is SNIS on the L−1 random points, exactly, on the same draws.

Random inner sets come in two layouts: ``shared`` (one random set R per block of queries, each
query keeping its own source term: the inner sums are GEMMs) and ``independent`` (each query its
own R: memory-bound gathers). ``exclude_source`` keeps the query's own source out of R (with a
shared R, the source is masked and a spare point takes its place, so every query sees exactly
L−1 random points when sampling without replacement).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from lossfloor.errors import UserError
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES, SoftmaxState, augment, posterior_mean

Tensor = torch.Tensor


@dataclass
class Pool:
    """The points a posterior ranges over: centred data x_n − x̄ (N×D), ‖x_n − x̄‖², A = mean‖·‖²,
    max‖·‖² (float64, whatever the pool's dtype), and the kernel's keys [x | 1 | −‖x‖²/2]."""

    x: Tensor
    sq: Tensor
    mean: Tensor
    a: float
    max_sq: float
    aug: Tensor

    @classmethod
    def from_data(cls, data: Tensor, dtype: torch.dtype, device: torch.device | str) -> Pool:
        x64 = data.reshape(data.shape[0], -1).to(device=device, dtype=torch.float64)
        mean = x64.mean(dim=0)
        xc = x64 - mean
        sq = xc.pow(2).sum(dim=1)
        xd = xc.to(dtype)
        return cls(
            x=xd,
            sq=sq.to(dtype),
            mean=mean,
            a=float(sq.mean()),
            max_sq=float(sq.max()),
            aug=augment(xd),
        )

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]


@dataclass
class PerSample:
    """Per-sample values of the two forms of J*(σ), per element: closed (A − ‖μ‖²)/D and
    direct ‖x0 − μ‖²/D."""

    closed: Tensor
    direct: Tensor


class Estimator(ABC):
    """One interface: ``name``, ``params()``, ``posterior_mean`` and ``__call__`` → PerSample."""

    name: str

    @abstractmethod
    def params(self) -> dict:
        """The estimator's parameters as recorded in results."""

    @abstractmethod
    def posterior_mean(
        self,
        pool: Pool,
        queries: Tensor,
        sources: Tensor,
        sigma: float,
        generator: torch.Generator,
        tile_bytes: int = DEFAULT_TILE_BYTES,
    ) -> Tensor:
        """μ̂(q) for centred queries q = x_{source} + σε (B×D); ``sources`` index ``pool``."""

    def check(self, n: int) -> None:  # noqa: B027 (most estimators run on any pool)
        """Raise UserError if the estimator cannot run on a pool of n points."""

    def __call__(
        self,
        pool: Pool,
        sources: Tensor,
        noise: Tensor,
        sigma: float,
        generator: torch.Generator,
        tile_bytes: int = DEFAULT_TILE_BYTES,
    ) -> PerSample:
        """Per-sample J* values for x_t = x0[sources] + σ·noise."""
        x0 = pool.x[sources]
        mu = self.posterior_mean(pool, x0 + sigma * noise, sources, sigma, generator, tile_bytes)
        d = pool.dim
        closed = (pool.a - mu.double().pow(2).sum(dim=1)) / d
        direct = (x0 - mu).double().pow(2).sum(dim=1) / d
        return PerSample(closed=closed, direct=direct)


class Full(Estimator):
    """μ over all N points: the exact posterior mean."""

    name = "full"

    def params(self) -> dict:
        return {"name": self.name, "inner": None, "C": None}

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        state = posterior_mean(queries, None, sigma, keys_aug=pool.aug, tile_bytes=tile_bytes)
        return state.mean()


@dataclass
class Subset(Estimator):
    """SNIS / DOL / cDOL: μ over a random set R (and the source, weighted 1/C).

    ``inner`` is L, the total inner size: R has L points for SNIS and L−1 with a source term.
    ``C`` is None for SNIS (no source term), else the source's weight divisor (math.inf allowed).
    """

    inner: int
    C: float | None = None
    replace: bool = False
    exclude_source: bool = False
    layout: str = "shared"
    share: int = 256
    name: str = field(default="snis")

    def __post_init__(self) -> None:
        if self.inner < 2:
            raise UserError(f"--inner {self.inner}: the inner set needs at least 2 points (L ≥ 2)")
        if self.C is not None and not self.C > 0:
            raise UserError(f"--C {self.C}: the correction C must be > 0 (1 is DOL, inf is SNIS)")
        if self.layout not in ("shared", "independent"):
            raise UserError(f"--layout {self.layout}: expected shared or independent")
        if self.share < 1:
            raise UserError(f"--share {self.share}: must be ≥ 1")

    @property
    def n_random(self) -> int:
        """|R|: L for SNIS, L−1 beside the source for DOL/cDOL."""
        return self.inner if self.C is None else self.inner - 1

    def params(self) -> dict:
        return {
            "name": self.name,
            "inner": self.inner,
            "C": self.C if self.C is None or math.isfinite(self.C) else "inf",
            "replace": self.replace,
            "exclude_source": self.exclude_source,
            "layout": self.layout,
            "share": self.share if self.layout == "shared" else None,
        }

    def check(self, n: int) -> None:
        if self.inner > n:
            raise UserError(f"--inner {self.inner} exceeds the number of data points N = {n}")

    def _draw(self, n: int, k: int, generator: torch.Generator, device) -> Tensor:
        """k indices from range(n), with or without replacement."""
        if self.replace:
            return torch.randint(n, (k,), generator=generator).to(device)
        return torch.randperm(n, generator=generator)[:k].to(device)

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        if self.layout == "shared":
            state = self._shared(pool, queries, sources, sigma, generator, tile_bytes)
        else:
            state = self._independent(pool, queries, sources, sigma, generator, tile_bytes)
        if self.C is not None:
            x_s = pool.x[sources]
            inv_var = 1.0 / (sigma * sigma)
            logit = ((queries * x_s).sum(dim=1) - 0.5 * pool.sq[sources]) * inv_var
            state.add_one(logit - math.log(self.C), x_s)
        return state.mean()

    def _shared(self, pool, queries, sources, sigma, generator, tile_bytes) -> SoftmaxState:
        k = self.n_random
        spare = self.exclude_source and not self.replace and k < pool.n
        states = []
        for start in range(0, queries.shape[0], self.share):
            q = queries[start : start + self.share]
            src = sources[start : start + self.share]
            idx = self._draw(pool.n, k + int(spare), generator, queries.device)
            exclude = None
            if self.exclude_source:
                exclude = src
                if spare:  # the spare point is dropped where the source did not take a slot
                    exclude = torch.where(torch.isin(src, idx), src, idx[-1])
            state = posterior_mean(
                q,
                None,
                sigma,
                keys_aug=pool.aug[idx],
                key_ids=idx,
                exclude_ids=exclude,
                tile_bytes=tile_bytes,
            )
            states.append(state)
        return SoftmaxState(
            m=torch.cat([s.m for s in states]),
            z=torch.cat([s.z for s in states]),
            acc=torch.cat([s.acc for s in states]),
        )

    def _independent(self, pool, queries, sources, sigma, generator, tile_bytes) -> SoftmaxState:
        b, d = queries.shape
        k = self.n_random
        n = pool.n
        if self.replace:
            if self.exclude_source:
                idx = torch.randint(n - 1, (b, k), generator=generator).to(queries.device)
                idx += (idx >= sources[:, None]).long()  # skip the source
            else:
                idx = torch.randint(n, (b, k), generator=generator).to(queries.device)
        else:
            keys_rand = torch.rand(b, n, generator=generator).to(queries.device)
            if self.exclude_source:
                keys_rand[torch.arange(b, device=queries.device), sources] = -1.0
            idx = keys_rand.topk(k, dim=1).indices
        inv_var = 1.0 / (sigma * sigma)
        state = SoftmaxState.empty(b, d, queries.dtype, queries.device)
        step = max(1, tile_bytes // (queries.element_size() * d * b))
        for start in range(0, k, step):
            cols = idx[:, start : start + step]
            keys = pool.x[cols]  # B×n×D gather: the memory-bound part
            logits = torch.bmm(keys, queries[:, :, None])[:, :, 0]
            logits.mul_(inv_var).sub_(pool.sq[cols] * (0.5 * inv_var))
            state.add_batched(logits, keys)
        return state


ESTIMATOR_NAMES = ("full", "snis", "dol", "cdol")


def resolve_C(c: str | float | None, n: int, inner: int) -> float:
    """C from a number, ``paper`` (4N/L) or ``balanced`` ((N−1)/(L−1))."""
    if c is None or c == "paper":
        return 4.0 * n / inner
    if c == "balanced":
        return (n - 1) / (inner - 1)
    try:
        value = float(c)
    except (TypeError, ValueError):
        raise UserError(f"--C {c!r}: expected a number, 'paper' (4N/L) or 'balanced'") from None
    if not value > 0:
        raise UserError(f"--C {c}: the correction C must be > 0 (1 is DOL, inf is SNIS)")
    return value


def make_estimator(
    name: str,
    n: int,
    *,
    inner: int | None = None,
    C: str | float | None = None,
    replace: bool = False,
    exclude_source: bool | None = None,
    layout: str = "shared",
    share: int = 256,
) -> Estimator:
    """Build an estimator for a pool of n points; checks every parameter (UserError)."""
    if name == "full":
        if inner is not None or C is not None:
            raise UserError("--inner and --C apply to snis, dol and cdol, not to full")
        return Full()
    if name not in ESTIMATOR_NAMES:
        raise UserError(f"unknown estimator {name!r}; choose one of: {', '.join(ESTIMATOR_NAMES)}")
    if inner is None:
        inner = max(2, min(n, n // 10))
    if exclude_source is None:
        exclude_source = name != "snis"
    c_value = {"snis": None, "dol": 1.0}.get(name)
    if name != "cdol" and C is not None:
        raise UserError(f"--C applies to cdol only, not {name}")
    if name == "cdol":
        c_value = resolve_C(C, n, max(inner, 2))
    est = Subset(
        inner=inner,
        C=c_value,
        replace=replace,
        exclude_source=exclude_source,
        layout=layout,
        share=share,
        name=name,
    )
    est.check(n)
    return est

"""Estimators of the posterior mean μ(x_t) = E[x0 | x_t] of an empirical dataset
(docs/method.md §3).

All of them are softmaxes of the one kernel (``kernel.py``) over different inner sets:

- ``full``  all N points: the exact posterior.
- ``snis``  L random points (self-normalised importance sampling).
- ``dol``   the source x0 that produced x_t plus L−1 random points.
- ``stratified``  the source and its nearest neighbours exactly, plus L random points weighted
            by their inverse inclusion probability N/L (``Stratified``).
- ``cdol``  as ``dol`` with the source's kernel weight divided by C (reconstructed):
            μ = (k_s/C·x_s + Σ_{j∈R} k_j x_j) / (k_s/C + Σ_{j∈R} k_j).
            C = 1 is DOL; C = ∞ is SNIS on the L−1 random points, exactly, on the same draws.

``gram`` (``gram.py``) is the exception: the exact weights of a whole σ grid from two Gram
products per block of draws, the rest of the posterior by weight-proportional draws.

Random inner sets come in two layouts: ``shared`` (one random set R per block of queries, each
query keeping its own source term: the inner sums are GEMMs) and ``independent`` (each query its
own R: memory-bound gathers). ``exclude_source`` keeps the query's own source out of R (with a
shared R, the source is masked and a spare point takes its place, so every query sees exactly
L−1 random points when sampling without replacement).

Each is a class registered in ``ESTIMATORS`` under its name, built from keyword parameters
(``ESTIMATORS.create("cdol", inner=180, C=40.0)``) with a ``to_config()`` / ``from_config()``
round trip. Each declares what it can do on its class (``capabilities``: where it runs, its
draws and forms, what it needs; ``capabilities.py``) and the defaults that depend on the pool
size N (``defaults_for``); ``make_estimator(name, n, ...)`` builds one from those alone.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lossfloor.errors import ParameterError, UserError
from lossfloor.optimal.capabilities import PLACES, Capabilities, having, listed
from lossfloor.optimal.kernel import DEFAULT_TILE_BYTES, Adjust, SoftmaxState
from lossfloor.optimal.pools import Pool
from lossfloor.registry import Registry

Tensor = torch.Tensor


@dataclass
class PerSample:
    """Per-sample values of the two forms of J*(σ), per element: closed (A − ‖μ‖²)/D and
    direct ‖x0 − μ‖²/D; on importance-sampled (tilted) draws, the likelihood ratio w of each
    draw (``draws.tilted_noise``; None on plain draws), whose known mean 1 gives a control
    variate (``moments.control_variate``), and a bound on the rounding error of the closed form's
    mean (the mean of w·``precision.closed_rounding``; 0: not checked)."""

    closed: Tensor
    direct: Tensor
    weight: Tensor | None = None
    closed_error: float = 0.0


ESTIMATORS: Registry[Estimator] = Registry("estimator")


class Estimator(ABC):
    """One interface: ``name``, ``capabilities``, ``defaults_for(n)``, ``to_config()``,
    ``posterior_mean`` and ``__call__`` → PerSample.

    ``ESTIMATORS.from_config(estimator.to_config())`` rebuilds an equal estimator.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @classmethod
    def defaults_for(cls, n: int) -> dict[str, Any]:
        """The parameters whose default depends on the pool size N (here: none)."""
        return {}

    @classmethod
    def for_pool(cls, n: int, **given: Any) -> Estimator:
        """This estimator for a pool of n points: ``defaults_for(n)`` under the ``given``
        parameters, checked against n (``check``)."""
        est = cls(**{**cls.defaults_for(n), **given})
        est.check(n)
        return est

    @property
    def neighbours_needed(self) -> int:
        """k of the pool's neighbour table this estimator reads (0: none)."""
        return 0

    def refusal(self, place: str) -> str | None:
        """Why this estimator, with its parameters, does not run on ``place`` (PLACES), or None
        where it does (its class's ``capabilities``)."""
        return self.capabilities.refusal(place)

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The name and parameters, as recorded in results (C = ∞ as "inf")."""

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
        """Raise ParameterError if the estimator cannot run on a pool of n points."""

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
        x0 = pool.rows(sources)[0]
        mu = self.posterior_mean(pool, x0 + sigma * noise, sources, sigma, generator, tile_bytes)
        d = pool.dim
        closed = (pool.a - mu.double().pow(2).sum(dim=1)) / d
        direct = (x0 - mu).double().pow(2).sum(dim=1) / d
        return PerSample(closed=closed, direct=direct)


@ESTIMATORS.register("full")
@dataclass(frozen=True, kw_only=True)
class Full(Estimator):
    """μ over all N points: the exact posterior mean. ``inner`` and ``C`` are recorded as None
    (the inner set is the whole pool) and must stay None."""

    name: ClassVar[str] = "full"
    capabilities: ClassVar[Capabilities] = Capabilities(
        runs_on=frozenset(PLACES), default_draws="tilted", default_form="combined", exact=True
    )
    inner: None = None
    C: None = None

    def __post_init__(self) -> None:
        for param in ("inner", "C"):
            if getattr(self, param) is not None:
                raise ParameterError(
                    param, getattr(self, param), "applies to snis, dol and cdol, not to full"
                )

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "inner": None, "C": None}

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        return pool.merge(pool.accumulate(queries, sigma, tile_bytes=tile_bytes)).mean()


@dataclass(frozen=True, kw_only=True)
class Subset(Estimator):
    """μ over a random set R (and, for DOL / cDOL, the source, weighted 1/C): the base of
    ``SNIS`` (C = None), ``DOL`` (C = 1) and ``CDOL`` (any C > 0, ∞ allowed).

    ``inner`` is L, the total inner size: R has L points for SNIS and L−1 with a source term.
    Both layouts run on every pool: the shared one through ``Pool.accumulate``, the
    independent one through ``Pool.rows`` (each query's own random rows, gathered by index).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        runs_on=frozenset(PLACES),
        default_draws="plain",
        default_form="closed",
        options=frozenset({"inner", "C", "replace", "exclude_source", "layout", "share"}),
    )

    inner: int
    C: float | None = None
    replace: bool = False
    exclude_source: bool = True
    layout: str = "shared"
    share: int | None = 256

    def __post_init__(self) -> None:
        if not self.inner >= 2:
            raise ParameterError("inner", self.inner, "the inner set needs at least 2 points")
        if self.layout not in ("shared", "independent"):
            raise ParameterError("layout", self.layout, "expected shared or independent")
        if self.layout == "independent":
            object.__setattr__(self, "share", None)  # each query has its own set: no sharing
        elif not (self.share is not None and self.share >= 1):
            raise ParameterError("share", self.share, "must be ≥ 1")
        self._check_C()

    @abstractmethod
    def _check_C(self) -> None:
        """Raise ParameterError unless C is what this estimator allows; store it as a float."""

    @property
    def n_random(self) -> int:
        """|R|: L for SNIS, L−1 beside the source for DOL/cDOL."""
        return self.inner if self.C is None else self.inner - 1

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner": self.inner,
            "C": self.C if self.C is None or math.isfinite(self.C) else "inf",
            "replace": self.replace,
            "exclude_source": self.exclude_source,
            "layout": self.layout,
            "share": self.share,
        }

    @classmethod
    def defaults_for(cls, n: int) -> dict[str, Any]:
        """L = max(2, N/10)."""
        return {"inner": max(2, min(n, n // 10))}

    def check(self, n: int) -> None:
        if self.inner > n:
            raise ParameterError("inner", self.inner, f"exceeds the number of data points N = {n}")

    def _draw(self, n: int, k: int, generator: torch.Generator, device) -> Tensor:
        """k indices from range(n), with or without replacement."""
        if self.replace:
            return torch.randint(n, (k,), generator=generator).to(device)
        return torch.randperm(n, generator=generator)[:k].to(device)

    def posterior_mean(
        self, pool, queries, sources, sigma, generator, tile_bytes=DEFAULT_TILE_BYTES
    ):
        if self.layout == "shared":
            state = pool.merge(self._shared(pool, queries, sources, sigma, generator, tile_bytes))
        else:  # the gathered rows are every process's: nothing to merge
            state = self._independent(pool, queries, sources, sigma, generator, tile_bytes)
        if self.C is not None:
            x_s, sq_s = pool.rows(sources)
            inv_var = 1.0 / (sigma * sigma)
            logit = ((queries * x_s).sum(dim=1) - 0.5 * sq_s) * inv_var
            state.add_one(logit - math.log(self.C), x_s)
        return state.mean()

    def _shared(self, pool, queries, sources, sigma, generator, tile_bytes) -> SoftmaxState:
        k, share = self.n_random, self.share
        assert share is not None  # the shared layout has one (``__post_init__``)
        spare = self.exclude_source and not self.replace and k < pool.n
        states = []
        for start in range(0, queries.shape[0], share):
            q = queries[start : start + share]
            src = sources[start : start + share]
            idx = self._draw(pool.n, k + int(spare), generator, queries.device)
            exclude = None
            if self.exclude_source:
                exclude = src
                if spare:  # the spare point is dropped where the source did not take a slot
                    exclude = torch.where(torch.isin(src, idx), src, idx[-1])
            states.append(pool.accumulate(q, sigma, idx, exclude, tile_bytes))
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
            keys, sq = pool.rows(cols)  # B×n×D gather: the memory-bound part
            logits = torch.bmm(keys, queries[:, :, None])[:, :, 0]
            logits.mul_(inv_var).sub_(sq * (0.5 * inv_var))
            state.add_batched(logits, keys)
        return state


@ESTIMATORS.register("snis")
@dataclass(frozen=True, kw_only=True)
class SNIS(Subset):
    """Self-normalised importance sampling: μ over L random points, no source term."""

    name: ClassVar[str] = "snis"
    exclude_source: bool = False

    def _check_C(self) -> None:
        if self.C is not None:
            raise ParameterError("C", self.C, "applies to cdol only, not snis")


@ESTIMATORS.register("dol")
@dataclass(frozen=True, kw_only=True)
class DOL(Subset):
    """The source plus L−1 random points, all weighted alike: cDOL with C = 1."""

    name: ClassVar[str] = "dol"
    C: float | None = 1.0

    def _check_C(self) -> None:
        if self.C != 1:
            raise ParameterError("C", self.C, "applies to cdol only; dol is C = 1")
        object.__setattr__(self, "C", 1.0)


@ESTIMATORS.register("cdol")
@dataclass(frozen=True, kw_only=True)
class CDOL(Subset):
    """The source weighted 1/C plus L−1 random points (docs/method.md §3, reconstructed)."""

    name: ClassVar[str] = "cdol"
    C: float = field()

    @classmethod
    def for_pool(cls, n: int, **given: Any) -> Estimator:
        """As ``Estimator.for_pool``, C by ``resolve_C`` (default ``paper``: 4N/L) of the L
        used."""
        inner = given.get("inner", cls.defaults_for(n)["inner"])
        return super().for_pool(n, **{**given, "C": resolve_C(given.get("C"), n, max(inner, 2))})

    def _check_C(self) -> None:
        try:
            value = float(self.C)  # "inf" as recorded in results
        except (TypeError, ValueError):
            raise ParameterError("C", self.C, "expected a number") from None
        if not value > 0:
            raise ParameterError(
                "C", self.C, "the correction C must be > 0 (1 is DOL, inf is SNIS)"
            )
        object.__setattr__(self, "C", value)


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


#: The stratified estimator's default near stratum: the source and its 15 nearest neighbours.
STRATIFIED_NEAR = 16


def resolve_C(c: str | float | None, n: int, inner: int) -> float:
    """C from a number, ``paper`` (4N/L, the default) or ``balanced`` ((N−1)/(L−1))."""
    if c is None or c == "paper":
        return 4.0 * n / inner
    if c == "balanced":
        return (n - 1) / (inner - 1)
    try:
        value = float(c)
    except (TypeError, ValueError):
        raise ParameterError("C", c, "expected a number, 'paper' (4N/L) or 'balanced'") from None
    if not value > 0:
        raise ParameterError("C", c, "the correction C must be > 0 (1 is DOL, inf is SNIS)")
    return value


#: ``make_estimator``'s parameters and the value of each that means "not given" (the CLI's
#: defaults): only the others reach the estimator, and only if its ``capabilities.options``
#: name them.
NOT_GIVEN: dict[str, Any] = {
    "inner": None, "C": None, "replace": False, "exclude_source": None, "layout": "shared",
    "share": 256, "near": None,
}  # fmt: skip


def declared() -> dict[str, Capabilities]:
    """Each registered estimator's name → its ``capabilities``, in registration order."""
    return {name: ESTIMATORS.get(name).capabilities for name in ESTIMATORS.names}


def make_estimator(name: str, n: int, **params: Any) -> Estimator:
    """The estimator ``name`` for a pool of n points, through ``ESTIMATORS``: the parameters
    given (those not at their NOT_GIVEN value) over the class's ``defaults_for(n)``
    (``for_pool``). A parameter the estimator does not take (its ``capabilities.options``) is
    refused, naming those that take it; every parameter is checked (ParameterError)."""
    key = ESTIMATORS.canonical(name)
    cls = ESTIMATORS.get(key)
    given = {}
    for param, value in params.items():
        if param not in NOT_GIVEN:
            raise ParameterError(param, value, f"not a parameter of an estimator ({key})")
        if value == NOT_GIVEN[param]:
            continue
        if param not in cls.capabilities.options:
            takers = having(declared(), lambda caps, p=param: p in caps.options)
            where = f"{takers[0]} only" if len(takers) == 1 else f"{listed(takers)}, not {key}"
            raise ParameterError(param, value, f"applies to {where}")
        given[param] = value
    return cls.for_pool(n, **given)


#: What names an estimator: an instance, a name, or a config ``{"name": ..., **parameters}``.
EstimatorSpec = Estimator | str | Mapping[str, Any]


def as_estimator(spec: EstimatorSpec, n: int) -> Estimator:
    """The estimator ``spec`` names for a pool of n points: an instance as it is; a name, or a
    config whose parameters ``make_estimator`` takes, through ``make_estimator`` (the ones left
    out get their defaults for this n); any other config (a recorded ``to_config()`` with
    gram's ``rows``) through ``ESTIMATORS.from_config``."""
    if isinstance(spec, Estimator):
        return spec
    if isinstance(spec, str):
        return make_estimator(spec, n)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise UserError(f"an estimator is a name, a config with a 'name' or an Estimator: {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    if params.keys() <= _MAKE_PARAMETERS:
        return make_estimator(spec["name"], n, **params)
    return ESTIMATORS.from_config(spec)


_MAKE_PARAMETERS = set(NOT_GIVEN)
